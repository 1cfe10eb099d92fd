"""Runtime paths (runtime.py): what latency() runs and reports, int8 and 2:4 conversions. No test
asserts on a duration: only on what was run, how often, and on the outputs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_lab.runtime import int8_dynamic, latency, semi_structured_reason, to_semi_structured


class Counting(nn.Module):
    """Records every batch it is called with and whether it was in eval mode, under no grad."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.calls: list[tuple[int, bool, bool]] = []

    def forward(self, x):
        self.calls.append((x.shape[0], self.training, torch.is_grad_enabled()))
        return self.fc(x)


def test_latency_runs_warmup_plus_repeats_per_batch_in_eval_mode_and_restores_training():
    m = Counting().train()
    x = torch.randn(5, 3)
    result = latency(m, x, batch_sizes=(1, 4), repeats=3, warmup=2)
    assert [b for b, _, _ in m.calls] == [1] * 5 + [4] * 5
    assert all(not training and not grad for _, training, grad in m.calls)
    assert m.training  # put back as found
    assert sorted(result.ms) == [1, 4] and all(v > 0 for v in result.ms.values())
    assert all(lo <= result.ms[b] <= hi for b, (lo, hi) in result.spread.items())
    assert result.device == "cpu" and result.threads == torch.get_num_threads()


@pytest.mark.parametrize("kwargs, message", [
    (dict(repeats=0), "repeats must be >= 1"), (dict(warmup=-1), "warmup >= 0"),
    (dict(batch_sizes=(0,)), "batch sizes must be positive integers, got 0"),
    (dict(batch_sizes=(True,)), "batch sizes must be positive integers, got True"),
])
def test_latency_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        latency(Counting(), torch.randn(2, 3), **kwargs)


def test_int8_copy_leaves_the_model_and_stays_close():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    try:
        q = int8_dynamic(m)
    except RuntimeError as e:
        pytest.skip(str(e))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    x = torch.randn(64, 16)
    ref, out = m(x), q(x)
    # int8 weights (per tensor) and activations: within a few quantization steps of the float output
    assert (out - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_2_4_weights_say_why_not_without_cuda():
    assert semi_structured_reason() == "needs a CUDA GPU (none is available here)"
    with pytest.raises(RuntimeError, match="2:4 semi-structured weights needs a CUDA GPU"):
        to_semi_structured(nn.Sequential(nn.Linear(8, 8)), ["0"])
