"""2:4 semi-structured sparsity, measured: a transformer-sized Linear (4096 x 4096, fp16) pruned 2:4
by prune_lab and converted with ``Session.compact(semi_structured=True)``, timed against the same
dense layer in the same run, batch of 4096 tokens. Needs CUDA with compute capability >= 8.0;
elsewhere it prints one JSON line saying why it was skipped. Also: int8 dynamic quantization of
LeNet-300-100's Linear layers on the CPU against the float model, same run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import prune_lab as pl  # noqa: E402
from prune_lab.runtime import semi_structured_reason  # noqa: E402


def main() -> None:
    out: dict = {"name": "nm"}
    # int8 dynamic quantization on the CPU (where the installed torch has an engine)
    data = pl.datasets.digits()
    torch.manual_seed(0)
    mlp = pl.models.mlp(data, hidden=(1024, 1024))
    x = data.test.tensors[0]
    dense_cpu = pl.latency(mlp, x, batch_sizes=(64,), repeats=50)
    try:
        q = pl.int8_dynamic(mlp)
        int8 = pl.latency(q, x, batch_sizes=(64,), repeats=50)
        out["int8_dynamic_cpu"] = {"float_ms": round(dense_cpu.ms[64], 3), "int8_ms": round(int8.ms[64], 3),
                                   "ratio": round(dense_cpu.ms[64] / int8.ms[64], 2), "threads": dense_cpu.threads}
    except RuntimeError as e:
        out["int8_dynamic_cpu"] = {"skipped": str(e)}
    reason = semi_structured_reason()
    if reason is not None:
        out["semi_structured"] = {"skipped": f"2:4 semi-structured weights {reason}"}
        print(json.dumps(out))
        return
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(4096, 4096)).half().cuda()
    tokens = torch.randn(4096, 4096, dtype=torch.float16, device="cuda")
    s = pl.Session(layer, (tokens[:256], torch.randint(0, 4096, (256,), device="cuda")), device="cuda", check=False)
    s.set_sparsity({"0": 0.5}, pattern="2:4")
    sparse = s.compact(semi_structured=True)
    dense = pl.latency(layer, tokens, batch_sizes=(4096,), repeats=100, warmup=20)
    fast = pl.latency(sparse, tokens, batch_sizes=(4096,), repeats=100, warmup=20)
    with torch.no_grad():
        diff = float((sparse(tokens) - layer(tokens)).abs().max())
    out["semi_structured"] = {"device": dense.device, "dense_ms": round(dense.ms[4096], 4), "sparse_ms": round(fast.ms[4096], 4),
                              "speedup": round(dense.ms[4096] / fast.ms[4096], 2), "max_abs_diff": diff}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
