from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

import prune_lab as pl
from prune_lab.datasets import read_idx


def test_digits_bundle_fixed_split():
    a, b = pl.datasets.digits(), pl.datasets.digits()
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10 and len(a.class_names) == 10
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 359
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    x = a.train.tensors[0]
    assert x.shape[1:] == (1, 8, 8) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_mnist_official_test_split(mnist_root):
    data = pl.datasets.mnist(mnist_root, train_from_test=8000)
    x, y = data.test.tensors
    assert len(data.train) == 8000 and len(data.test) == 2000
    assert x.shape == (2000, 1, 28, 28) and data.num_classes == 10
    full = read_idx(mnist_root / "t10k-labels-idx1-ubyte.gz")
    assert full.shape == (10000,) and full[0] == 7  # the first official test label is a 7
    assert torch.equal(y, torch.from_numpy(full[8000:].astype(np.int64)))


def test_mnist_missing_train_files_is_clear(mnist_root):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*download=True.*train_from_test"):
        pl.datasets.mnist(mnist_root)


def test_mnist_missing_everything_no_network(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        pl.datasets.mnist(tmp_path)


def test_idx_reader_rejects_garbage(tmp_path):
    p = tmp_path / "x.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\x01\x02\x03\x04garbage")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(p)
    q = tmp_path / "y"
    q.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")  # says 5 bytes, holds 2
    with pytest.raises(ValueError, match="truncated"):
        read_idx(q)

@pytest.fixture(scope="module")
def text():
    return pl.datasets.python_text(seq_len=32, max_chars=40_000)


def test_python_text_is_next_character_prediction_on_disjoint_windows(text):
    import pydoc_data.topics as topics

    raw = "".join(topics.topics[k] for k in sorted(topics.topics))[:40_000]
    x, y = text.train.tensors
    assert x.shape[1] == 32 and torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert "".join(text.class_names[i] for i in x[0].tolist()) == raw[:32]
    tx, ty = text.test.tensors
    assert len(x) + len(tx) == 40_000 // 33 and len(tx) == round(0.1 * (40_000 // 33))
    start = len(x) * 33  # the test split starts after the last training window
    assert "".join(text.class_names[i] for i in tx[0].tolist()) == raw[start : start + 32]
    assert text.num_classes == len(set(raw)) == len(text.class_names)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        pl.datasets.python_text(seq_len=1)


def test_with_val_holds_out_part_of_train_and_keeps_test():
    data = pl.datasets.digits()
    split = data.with_val(0.25, seed=3)
    n = len(data.train)
    assert len(split.val) == round(0.25 * n) and len(split.train) == n - round(0.25 * n)
    assert split.test is data.test and data.val is None
    rows = lambda ds: {tuple(r.tolist()) for r in ds.tensors[0].flatten(1)}  # noqa: E731
    assert rows(split.train) | rows(split.val) == rows(data.train)
    assert not rows(split.train) & rows(split.val) - rows(data.test)  # disjoint (up to duplicate images)
    assert len(split.train) + len(split.val) == n
    assert torch.equal(split.val.tensors[0], data.with_val(0.25, seed=3).val.tensors[0])  # seeded
    assert "val" in repr(split) and len(list(split.loader("val", batch_size=1000))) == 1
    with pytest.raises(ValueError, match="already has a validation split"):
        split.with_val(0.1)
    with pytest.raises(ValueError, match="fraction must leave 1 to"):
        data.with_val(0.0)
    with pytest.raises(ValueError, match=r"or 'val' after with_val\(\)"):
        data.loader("val")
