"""Datasets as DataBundles: the bundled 8x8 digits (no download) and real MNIST IDX files."""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset


@dataclass
class DataBundle:
    """Train/test tensors plus what a model needs to size itself; ``val`` (after
    :meth:`with_val`) is held out of ``train`` for choices (sensitivity, plans, thresholds), so
    the test split is touched only for the final number."""

    name: str
    train: TensorDataset
    test: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    val: Optional[TensorDataset] = None

    def with_val(self, fraction: float = 0.2, seed: int = 0) -> "DataBundle":
        """A copy whose ``val`` is ``round(fraction * len(train))`` training samples (a seeded
        permutation) and whose ``train`` is the rest; ``test`` is the same object."""
        if self.val is not None:
            raise ValueError(f"{self.name!r} already has a validation split ({len(self.val)} samples)")
        n = len(self.train)
        k = int(round(fraction * n))
        if isinstance(fraction, bool) or not 0 < k < n:
            raise ValueError(f"with_val: fraction must leave 1 to {n - 1} of the {n} training samples for validation, "
                             f"got {fraction!r}")
        x, y = self.train.tensors
        train, val = _split(x, y, fraction, seed)
        return DataBundle(self.name, train, self.test, self.input_shape, self.num_classes, list(self.class_names), val)

    def loader(self, split: str = "train", batch_size: int = 64, shuffle: Optional[bool] = None, seed: int = 0) -> DataLoader:
        splits = {"train": self.train, "test": self.test, "val": self.val}
        if split not in splits or splits[split] is None:
            raise ValueError(f"split {split!r}: use 'train', 'test'" + (" or 'val'" if self.val is not None else
                                                                       " (or 'val' after with_val())"))
        ds = splits[split]
        g = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=(split == "train") if shuffle is None else shuffle, generator=g)

    def __repr__(self) -> str:
        val = f" / {len(self.val)} val" if self.val is not None else ""
        return (
            f"DataBundle({self.name!r}: {len(self.train)} train{val} / {len(self.test)} test, "
            f"input {self.input_shape}, {self.num_classes} classes)"
        )


def _split(x: Tensor, y: Tensor, test_fraction: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def digits(test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1], fixed seeded split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    train, test = _split(x, y, test_fraction, seed)
    return DataBundle("digits", train, test, (1, 8, 8), 10, [str(i) for i in range(10)])


# ---------------------------------------------------------------- MNIST
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c"),
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def python_text(seq_len: int = 64, max_chars: Optional[int] = 200_000, test_fraction: float = 0.1) -> DataBundle:
    """Characters of the Python documentation that ships with Python (``pydoc_data.topics``; no
    download) as next-character prediction: ``x`` (windows, seq_len) token ids, ``y`` the same
    shifted by one. Windows do not overlap; the last ``test_fraction`` of the text is the test
    split, so no test character was seen in training. ``class_names`` are the characters."""
    import pydoc_data.topics as topics

    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    text = "".join(topics.topics[k] for k in sorted(topics.topics))
    text = text[:max_chars] if max_chars else text
    chars = sorted(set(text))
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = torch.from_numpy(np.searchsorted(np.array([ord(c) for c in chars], dtype=np.uint32), codes).astype(np.int64))
    windows = ids[: len(ids) // (seq_len + 1) * (seq_len + 1)].reshape(-1, seq_len + 1)
    n_test = max(1, int(round(len(windows) * test_fraction)))
    train, test = windows[:-n_test], windows[-n_test:]
    return DataBundle("python_text", TensorDataset(train[:, :-1], train[:, 1:]), TensorDataset(test[:, :-1], test[:, 1:]),
                      (seq_len,), len(chars), chars)


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read an IDX file (optionally .gz): the format MNIST is distributed in."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(data[2])
    if dtype is None:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {arr.size} elements (truncated?)")
    return arr.reshape(shape)


def _find(root: Path, stem: str) -> Optional[Path]:
    for candidate in (root / f"{stem}.gz", root / stem, root / "MNIST" / "raw" / f"{stem}.gz", root / "MNIST" / "raw" / stem):
        if candidate.exists():
            return candidate
    return None


def _download(root: Path, stem: str, md5: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{stem}.gz"
    tmp = target.with_name(target.name + ".part")
    with urllib.request.urlopen(MNIST_URL + f"{stem}.gz", timeout=60) as r:
        tmp.write_bytes(r.read())
    if hashlib.md5(tmp.read_bytes()).hexdigest() != md5:
        tmp.unlink()
        raise RuntimeError(f"downloaded {stem}.gz has the wrong checksum; try again")
    os.replace(tmp, target)
    return target


def _load_split(root: Path, kind: str, download: bool) -> Optional[tuple[Tensor, Tensor]]:
    paths = []
    for part in ("images", "labels"):
        stem, md5 = MNIST_FILES[f"{kind}_{part}"]
        p = _find(root, stem)
        if p is None and download:
            p = _download(root, stem, md5)
        paths.append(p)
    if None in paths:
        return None
    images = torch.from_numpy(read_idx(paths[0]).copy()).float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)
    labels = torch.from_numpy(read_idx(paths[1]).astype(np.int64))
    if len(images) != len(labels):
        raise ValueError(f"MNIST {kind}: {len(images)} images but {len(labels)} labels in {root}")
    return images, labels


def mnist(root: Union[str, Path], download: bool = False, train_from_test: Optional[int] = None) -> DataBundle:
    """MNIST from IDX files under ``root`` (``.gz`` or raw, flat or torchvision's MNIST/raw).

    ``download=True`` fetches missing official files (needs a network). ``train_from_test=n``
    uses only the 10k test split: its first ``n`` images train, the rest test.
    """
    root = Path(root).expanduser()
    test = _load_split(root, "test", download)
    if test is None:
        raise FileNotFoundError(
            f"MNIST test files (t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) not found in {root}; "
            "pass download=True to fetch them"
        )
    names = [str(i) for i in range(10)]
    if train_from_test is not None:
        if not 0 < train_from_test < len(test[0]):
            raise ValueError(f"train_from_test must be in 1..{len(test[0]) - 1}, got {train_from_test}")
        x, y = test
        n = train_from_test
        return DataBundle("mnist", TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:]), (1, 28, 28), 10, names)
    train = _load_split(root, "train", download)
    if train is None:
        raise FileNotFoundError(
            f"MNIST train files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]) not found in {root}; "
            "pass download=True to fetch them, or train_from_test=N to split the test set"
        )
    return DataBundle("mnist", TensorDataset(*train), TensorDataset(*test), (1, 28, 28), 10, names)
