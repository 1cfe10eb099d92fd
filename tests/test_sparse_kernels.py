"""sparse_kernels: the break-even reading and what the timing records, checked on exact values.

No test asserts on a time: only that times were taken (positive, one per run) and that the
numbers derived from them follow from them.
"""
from __future__ import annotations

import pytest
import torch

from prune_lab import sparse_kernels as sk
from prune_lab.sparse_kernels import KernelRow, KernelTimings, break_even


@pytest.mark.parametrize("sparsities, speedups, expected", [
    ([0.5, 0.7, 0.9], [0.5, 0.8, 1.2], 0.8),                # 0.7 + (1 - 0.8) * 0.2 / 0.4
    ([0.9, 0.5, 0.7], [1.2, 0.5, 0.8], 0.8),                # order of the input does not matter
    ([0.5, 0.6, 0.7, 0.8], [1.1, 0.9, 0.95, 1.5], 0.7 + 0.05 * 0.1 / 0.55),  # from the *last* loss on
    ([0.5, 0.8], [0.6, 1.0], 0.8),                          # exactly even counts as winning
    ([0.5, 0.6, 0.8], [1.2, 1.0, 1.5], 0.5),                # ... also below the top
    ([0.3, 0.6], [1.2, 2.0], 0.3),                          # already faster at the lowest level
    ([0.7], [1.0], 0.7),
])
def test_break_even_interpolates_from_the_last_losing_level(sparsities, speedups, expected):
    assert break_even(sparsities, speedups) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("speedups", [[0.5, 0.9], [1.5, 0.99]])
def test_break_even_is_none_when_the_densest_tested_level_loses(speedups):
    assert break_even([0.5, 0.9], speedups) is None


@pytest.mark.parametrize("sparsities, speedups", [([], []), ([0.5, 0.9], [1.0])])
def test_break_even_wants_one_speedup_per_sparsity(sparsities, speedups):
    with pytest.raises(ValueError, match="one speedup per sparsity"):
        break_even(sparsities, speedups)


def test_row_speedup_and_timings_break_even_come_from_the_times():
    rows = [KernelRow(0.5, 50, 2.0, 4.0, 0.0), KernelRow(0.9, 10, 2.0, 1.0, 0.0)]
    assert [r.speedup for r in rows] == [0.5, 2.0]
    t = KernelTimings((10, 10), 4, "csr", "cpu", 2, 5, rows)
    assert t.break_even == pytest.approx(0.5 + 0.5 * 0.4 / 1.5)
    text = repr(t)
    assert "W 10x10 @ X 10x4, csr vs dense on cpu, 2 threads, median of 5" in text
    assert "0.50x" in text and "2.00x" in text and "break-even at about 63% sparsity" in text
    assert "sparse never faster" in repr(KernelTimings((10, 10), 4, "csr", "cpu", 2, 5, rows[:1]))


@pytest.mark.parametrize("sparsities", [(0.0, 0.5, 0.9), (0.3333, 0.98)])
def test_operands_have_exactly_the_asked_zeros_and_shared_values(sparsities):
    x, weights = sk.random_operands(7, 13, 3, sparsities, seed=4)
    assert x.shape == (13, 3) and len(weights) == len(sparsities)
    n = 7 * 13
    full = torch.randn(7, 13, generator=torch.Generator().manual_seed(4))
    for s, w in zip(sparsities, weights):
        assert w.shape == (7, 13) and w.dtype == torch.float32
        assert int((w != 0).sum()) == n - round(s * n)
        kept = w != 0
        assert torch.equal(w[kept], full[kept])  # the same values at every level, only zeros added
    again_x, again = sk.random_operands(7, 13, 3, sparsities, seed=4)
    assert torch.equal(again_x, x) and all(torch.equal(a, b) for a, b in zip(again, weights))


@pytest.mark.parametrize("layout", sk.LAYOUTS)
def test_timing_records_every_level_on_the_operands_it_names(layout):
    levels = (0.5, 0.9)
    t = sk.time_sparse_matmul(24, 40, 5, levels, layout=layout, repeats=3, warmup=1, seed=2)
    assert (t.shape, t.batch, t.layout, t.device, t.repeats) == ((24, 40), 5, layout, "cpu", 3)
    assert t.threads == torch.get_num_threads()
    x, weights = sk.random_operands(24, 40, 5, levels, seed=2)
    assert [r.sparsity for r in t.rows] == list(levels)
    for row, w in zip(t.rows, weights):
        assert row.nonzeros == 24 * 40 - round(row.sparsity * 24 * 40)
        assert row.dense_ms > 0 and row.sparse_ms > 0
        # the recorded error is the sparse product's difference from the dense one, recomputed here
        # in float64 for the order-free reference: both float32 products lie within 1e-4 of it
        exact = w.double() @ x.double()
        sparse_w = w.to_sparse_csr() if layout == "csr" else w.to_sparse_coo()
        expected = float((sparse_w @ x - w @ x).abs().max())
        assert row.max_error == pytest.approx(expected, abs=1e-5)
        assert float((w @ x).double().sub(exact).abs().max()) < 1e-4 and row.max_error < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_timing_on_cuda():
    t = sk.time_sparse_matmul(64, 64, 8, (0.9,), repeats=2, warmup=1, device="cuda")
    assert t.device == torch.cuda.get_device_name(0) and t.rows[0].nonzeros == 64 * 64 - round(0.9 * 64 * 64)


@pytest.mark.parametrize("kwargs, message", [
    (dict(layout="bsr"), "layout must be one of csr, coo, got 'bsr'"),
    (dict(sparsities=(0.5, 1.0)), "sparsity 1.0 must be in \\[0, 1\\)"),
    (dict(sparsities=(-0.1,)), "sparsity -0.1 must be in"),
    (dict(sparsities=(float("nan"),)), "sparsity nan must be in"),
    (dict(sparsities=(True,)), "sparsity True must be in"),
    (dict(sparsities=()), "at least one sparsity"),
    (dict(repeats=0), "repeats must be a positive integer, got 0"),
    (dict(batch=2.5), "batch must be a positive integer, got 2.5"),
    (dict(out_features=True), "out_features must be a positive integer, got True"),
    (dict(warmup=-1), "warmup must be an integer >= 0, got -1"),
])
def test_bad_arguments_are_named(kwargs, message):
    args = dict(out_features=8, in_features=8, batch=2, sparsities=(0.5,), repeats=1, warmup=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sk.time_sparse_matmul(**args)


@pytest.mark.parametrize("layout", sk.LAYOUTS)
def test_each_column_times_its_own_product(layout, monkeypatch):
    """No clock: each timed call reports the layout of the weight it multiplied (1 ms dense, 2 ms
    sparse), so the dense column must hold only dense products and the sparse only sparse ones."""
    from torch.overrides import TorchFunctionMode

    class Layouts(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if args and isinstance(args[0], torch.Tensor) and func.__name__ in ("__matmul__", "matmul"):
                self.seen.append(args[0].layout)
            return func(*args, **(kwargs or {}))

    calls = []

    def fake_timed_ms(fn, device):
        with Layouts() as mode:
            fn()
        (seen,) = mode.seen
        calls.append(seen)
        return 1.0 if seen == torch.strided else 2.0

    monkeypatch.setattr(sk, "timed_ms", fake_timed_ms)
    t = sk.time_sparse_matmul(8, 8, 2, (0.5, 0.9), layout=layout, repeats=3, warmup=2)
    assert [(r.dense_ms, r.sparse_ms) for r in t.rows] == [(1.0, 2.0), (1.0, 2.0)]
    wanted = torch.sparse_csr if layout == "csr" else torch.sparse_coo
    assert calls == [torch.strided, wanted] * (2 + 3) * 2  # warmup then repeats, alternating, per level
