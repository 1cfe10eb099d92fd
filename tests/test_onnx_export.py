"""ONNX export checked by running the file in ONNX Runtime against PyTorch on the eval data, for
dense, masked, 2:4, quantized and compact models; failures leave no file."""
from __future__ import annotations

import pytest
import torch

import prune_lab as pl
from tests import zoo_extra

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _ort(path, x):
    sess = pl.onnx_export.ort_session(path, 1)
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("state", ["dense", "masked", "2:4", "int4", "compact"])
def test_onnx_runtime_computes_what_pytorch_computes(demo_session, tmp_path, state):
    s = demo_session
    model = s.model
    if state == "masked":
        s.set_global_sparsity(0.8)
    elif state == "2:4":
        s.set_global_sparsity(0.5, pattern="2:4")
    elif state == "int4":
        s.set_global_sparsity(0.5)
        s.set_global_bits(4)
    elif state == "compact":
        s.set_sparsity({"conv2": 0.5}, pattern="channels")
        model = s.compact(measure=False)
    x = s.data.inputs[:64]
    report = s.export_onnx(tmp_path / "m.onnx") if state != "compact" else pl.export_onnx(model, x[:2], tmp_path / "m.onnx", x)
    checked = x if state == "compact" else s.data.sample(256)[0]  # what the Session checks: 256 eval samples
    assert report.path.stat().st_size == report.bytes and report.checked_samples == len(checked)
    with torch.no_grad():
        want, want_checked = model(x), model(checked)
    for b in (1, 7, 64):  # a dynamic batch: any size runs
        got = _ort(report.path, x[:b])
        assert got.shape == want[:b].shape
        assert float((got - want[:b]).abs().max()) <= report.tolerance
    assert report.max_abs_diff <= report.tolerance == max(1e-5, 1e-4 * float(want_checked.abs().max()))
    assert report.max_abs_diff == float((_ort(report.path, checked) - want_checked).abs().max()) or report.max_abs_diff < 1e-5
    assert not (tmp_path / "m.onnx.partial").exists()


def test_a_compact_model_is_a_smaller_onnx_file(demo_session, tmp_path):
    s = demo_session
    dense = s.export_onnx(tmp_path / "dense.onnx")
    s.set_sparsity({"conv1": 0.5, "conv2": 0.5}, pattern="channels")
    masked = s.export_onnx(tmp_path / "masked.onnx")
    small = pl.export_onnx(s.compact(measure=False), s.data.inputs[:2], tmp_path / "small.onnx")
    assert abs(masked.bytes - dense.bytes) < 1024  # zeros are still stored: same size
    removed = sum(int((~s.mask(i.name)).sum()) for i in s.layers)
    assert dense.bytes - small.bytes >= 4 * removed * 0.9  # float32 weights gone (biases and BN entries too)


def test_an_untraceable_model_is_refused_by_name_and_leaves_no_file(tmp_path):
    model = zoo_extra.Untraceable()
    with pytest.raises(RuntimeError, match=r"cannot export Untraceable to ONNX.*(zoo_extra\.py:\d+ in forward)?.*torch\.where"):
        pl.export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "u.onnx")
    assert list(tmp_path.iterdir()) == []


def test_latency_in_onnx_runtime_uses_the_same_interface(demo_session, tmp_path):
    s = demo_session
    x = s.data.inputs[:4]
    report = s.export_onnx(tmp_path / "m.onnx")
    for model in (report, report.path, s.model):
        lat = pl.latency(model, x, batch_sizes=(1, 3), repeats=2, warmup=1, runtime="onnxruntime")
        assert lat.runtime == "onnxruntime" and set(lat.ms) == {1, 3} and lat.threads == torch.get_num_threads()
        assert all(v > 0 for v in lat.ms.values()) and "in onnxruntime" in repr(lat)
    assert pl.latency(s.model, x, batch_sizes=(1,), repeats=1, warmup=0).runtime == "torch"
    with pytest.raises(ValueError, match="runtime must be 'torch' or 'onnxruntime', got 'tvm'"):
        pl.latency(s.model, x, runtime="tvm")
    with pytest.raises(ValueError, match="is not a file"):
        pl.latency(tmp_path / "none.onnx", x, runtime="onnxruntime")


def test_a_mismatch_is_refused_and_not_written(demo_session, tmp_path):
    with pytest.raises(RuntimeError, match=r"differ from PyTorch's by .* not written"):
        pl.export_onnx(demo_session.model, demo_session.data.inputs[:2], tmp_path / "m.onnx", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_int8_onnx_is_smaller_and_its_distance_from_float_is_measured_honestly(demo_session, tmp_path):
    s = demo_session
    x = s.data.inputs[:64]
    float_file = s.export_onnx(tmp_path / "m.onnx")
    q = pl.onnx_export.int8_onnx(float_file, tmp_path / "q.onnx", s.model, x)
    assert q.bytes == q.path.stat().st_size < float_file.bytes / 2  # int8 weights: about a quarter of float32
    got = _ort(q.path, x)
    with torch.no_grad():
        want = s.model(x)
    assert q.max_abs_diff == pytest.approx(float((got - want).abs().max()), rel=1e-6)
    assert q.top1_agreement == float((got.argmax(1) == want.argmax(1)).float().mean()) and q.checked_samples == 64
    lat = pl.latency(q, x, batch_sizes=(1,), repeats=2, warmup=1, runtime="onnxruntime")
    assert lat.runtime == "onnxruntime" and lat.ms[1] > 0
    with pytest.raises(ValueError, match="is not a file"):
        pl.onnx_export.int8_onnx(tmp_path / "none.onnx", tmp_path / "z.onnx", s.model, x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "q.onnx"]
