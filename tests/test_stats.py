"""The stats table against independent counts: nonzeros counted in the tensors here, file bytes
as the length of the file export() writes, and the size plan recomputing only what changed."""
from __future__ import annotations

import torch

import prune_lab as pl
import prune_lab.compress as compress
from tests.conftest import zoo_model


def test_counts_and_file_bytes_equal_the_tensors_and_the_written_files(digits, tmp_path):
    s = pl.Session(zoo_model("lenet5", digits), digits.test, device="cpu")
    s.set_sparsity({"conv2": 0.6, "fc1": 0.9})
    s.set_bits({"fc2": 4}, method="kmeans")
    st = s.stats()
    for i in s.layers:
        w = s.state.weights[i.name]
        assert st.layers[i.name]["nonzeros"] == int((w != 0).sum()) and st.layers[i.name]["params"] == w.numel()
    assert st.total["nonzeros"] == sum(int((s.state.weights[i.name] != 0).sum()) for i in s.layers)
    sparse = s.export(tmp_path / "m.pt", sparse=True)["model"]
    assert st.total["sparse_file_bytes"] == sparse.stat().st_size == s.sparse_file_bytes()
    assert st.total["dense_file_bytes"] == s.dense_file_bytes() == len(pl.export.serialize(s.original_state()))


def test_after_a_slider_move_only_that_layers_share_is_recomputed(digits, monkeypatch):
    s = pl.Session(zoo_model("lenet5", digits), digits.test, device="cpu")
    s.set_sparsity({"conv2": 0.5, "fc1": 0.5, "fc2": 0.5})
    s.stats()
    planned = []
    real = compress.plan_tensor
    monkeypatch.setattr(compress, "plan_tensor", lambda t, q: planned.append(t.shape) or real(t, q))
    s.set_sparsity({"fc1": 0.7})
    again = s.stats()
    assert planned == [torch.Size(s.layer("fc1").shape)]  # conv2 and fc2 came from the cache
    fresh = pl.Session(zoo_model("lenet5", digits), digits.test, device="cpu")
    fresh.set_sparsity({"conv2": 0.5, "fc1": 0.7, "fc2": 0.5})
    assert again.total["sparse_file_bytes"] == fresh.stats().total["sparse_file_bytes"]  # the cache changes no byte


def test_the_speed_notes_say_what_the_theoretical_figure_means_on_this_runtime(demo_session):
    from prune_lab.runtime import semi_structured_reason

    s = demo_session
    assert s.stats().speed == []  # nothing pruned: nothing to explain
    s.set_sparsity({"fc1": 0.5, "fc2": 0.5})
    st = s.stats()
    where = f"torch on cpu, {torch.get_num_threads()} threads"
    assert st.speed == [f"theoretical speedup {st.total['speedup']:.2f}x: MACs counted, not timed",
                        f"unstructured/kernel zeros in fc1, fc2: dense kernels still multiply them, so {where} runs them "
                        "no faster (no gain from this part)"]
    s.reset()
    s.set_sparsity({"fc2": 0.5}, pattern="2:4")
    s.set_sparsity({"conv2": 0.5}, pattern="channels")
    s.set_global_bits(8)
    notes = s.stats().speed
    reason = semi_structured_reason(torch.device("cpu"))
    assert notes[1] == f"2:4 in fc2: semi-structured kernels {reason}; here it runs as dense (no gain)"
    assert notes[2].startswith("channels/blocks in conv2, fc1: faster only once removed: compact()")
    assert "pl.int8_dynamic (torch.ao)" in notes[3] and "runtime='onnxruntime'" in notes[3]
    assert all(n in repr(s.stats()) for n in notes[1:])
