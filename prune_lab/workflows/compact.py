"""Physical removal: the channels a session masked, taken out of a copy of the model.

The copy holds the live (masked) weights; Torch-Pruning removes each group's channels from it.
Its outputs are checked against the masked model's before it is returned. It is saved as its
state_dict plus the structure (the removed channel indices per group root module and the example
input's shape) that rebuilds its shape from the original architecture: nothing is pickled.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from ..groups import remove_channels
from ..heads import remove_heads
from ..measure import OUTPUT_TOLERANCE, output_difference
from ..state import PruningState

STRUCTURE_FORMAT = 1


@dataclass
class CompactReport:
    """Dense vs compact, all measured: per-sample MACs of the matrix products and convolutions,
    parameters, file bytes of ``torch.save`` of the state_dict's tensors (a plain dict, as
    ``Session.export`` writes), median latency (ms) per batch size,
    and the largest output difference from the masked model on the check batch."""

    dense: dict[str, Any]
    compact: dict[str, Any]
    max_abs_diff: float
    output_scale: float
    threads: int = field(default_factory=torch.get_num_threads)
    device: str = "cpu"

    def ratios(self) -> dict[str, float]:
        """dense / compact for every figure both sides have (2.0: half the MACs, twice as fast)."""
        return {k: self.dense[k] / self.compact[k] for k in self.dense if k in self.compact and self.compact[k]}

    def rows(self) -> list[tuple[str, Any, Any, float]]:
        return [(k, self.dense[k], self.compact[k], r) for k, r in self.ratios().items()]

    def __repr__(self) -> str:
        lines = [f"CompactReport (measured on {self.device}, {self.threads} threads; outputs within "
                 f"{self.max_abs_diff:.2g} of the masked model's, scale {self.output_scale:.3g})"]
        lines.append(f"  {'':<18} {'dense':>14} {'compact':>14}  dense/compact")
        for k, d, c, r in self.rows():
            fmt = (lambda v: f"{v:>14,}") if isinstance(d, int) else (lambda v: f"{v:>14.3f}")
            lines.append(f"  {k:<18} {fmt(d)} {fmt(c)}  {r:5.2f}x")
        return "\n".join(lines)


def structure_of(model: nn.Module) -> dict[str, Any]:
    structure = getattr(model, "prune_lab_structure", None)
    if not isinstance(structure, dict):
        raise ValueError("this model has no prune_lab structure: make it with Session.compact()")
    return structure


class RemovedBlock(nn.Module):
    """What a removed block becomes: its first input, whatever else its caller passes
    (``nn.Identity`` takes one argument; a transformer block is called with a mask too)."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


def replace_blocks(model: nn.Module, blocks: Sequence[str]) -> nn.Module:
    """Replace each named submodule of ``model`` by a :class:`RemovedBlock` (in place). Nested
    names are fine: an outer block replaced first makes the inner ones moot."""
    for name in sorted(blocks, key=len):
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            continue  # inside a block already replaced
        if not hasattr(parent, child):
            raise ValueError(f"no module {name!r} in {type(model).__name__} (another architecture?)")
        setattr(parent, child, RemovedBlock())
    return model


def compact_copy(model: nn.Module, removed: Mapping[str, list[int]], example_input: Tensor,
                 blocks: Sequence[str] = (), heads: Mapping[str, list[int]] = {}) -> nn.Module:
    """A deep copy of ``model`` with ``removed`` (group root module -> channel indices) taken
    out, the removed ``heads`` (attention module -> head indices) taken out after them and the
    removed ``blocks`` replaced by the identity."""
    small = copy.deepcopy(model)
    if removed:
        remove_channels(small, example_input, removed)
    remove_heads(small, heads)
    replace_blocks(small, blocks)
    small.prune_lab_structure = {  # type: ignore[assignment]
        "prune_lab_structure": STRUCTURE_FORMAT,
        "removed": {k: [int(i) for i in v] for k, v in removed.items() if v},
        "blocks": sorted(blocks),
        "heads": {k: [int(i) for i in v] for k, v in heads.items() if v},
        "example_shape": [1, *example_input.shape[1:]],
        "example_dtype": str(example_input.dtype).replace("torch.", ""),
    }
    return small


def save_compact(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write a compact model: ``torch.save({"state_dict": ..., "structure": <json>})`` (tensors
    and a string, loadable with ``weights_only=True``). Rebuild it with :func:`load_compact`."""
    structure = structure_of(model)
    path = Path(path)
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "structure": json.dumps(structure)}, path)
    return path


def load_compact(path: Union[str, Path], model: nn.Module) -> nn.Module:
    """The compact model saved at ``path``, rebuilt from ``model`` (a fresh instance of the
    original architecture, modified in place and returned): its channels removed as recorded,
    then the saved weights loaded (``weights_only=True``; shapes must match exactly)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "structure" not in data or "state_dict" not in data:
        raise ValueError(f"{path}: not a compact model written by save_compact()")
    structure = json.loads(data["structure"])
    if structure.get("prune_lab_structure") != STRUCTURE_FORMAT:
        raise ValueError(f"{path}: unknown structure format {structure.get('prune_lab_structure')!r}")
    dtype = getattr(torch, structure["example_dtype"])
    example = torch.zeros(structure["example_shape"], dtype=dtype, device=next(model.parameters()).device)
    if structure["removed"]:
        remove_channels(model, example, structure["removed"])
    remove_heads(model, structure.get("heads", {}))
    replace_blocks(model, structure.get("blocks", []))
    own = model.state_dict()
    bad = [k for k, v in data["state_dict"].items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{path}: the saved weights do not fit this architecture ({', '.join(bad[:3])}); "
                         "pass a fresh instance of the model the session pruned")
    model.load_state_dict(data["state_dict"])
    model.prune_lab_structure = structure  # type: ignore[assignment]
    return model


def measure_pair(dense: nn.Module, small: nn.Module, example_input: Tensor, latency: bool = True,
                 batch_sizes: tuple[int, ...] = (1, 64), repeats: int = 20) -> tuple[dict[str, Any], dict[str, Any]]:
    """Measured figures of both models (see :class:`CompactReport`)."""
    from ..export import serialize
    from ..measure import model_macs
    from ..runtime import latency as measure_latency

    out = []
    for m in (dense, small):
        row: dict[str, Any] = {
            "macs": model_macs(m, example_input[:1]),
            "params": sum(p.numel() for p in m.parameters()),
            "file_bytes": len(serialize({k: v.detach().cpu() for k, v in m.state_dict().items()})),
        }
        out.append(row)
    if latency:  # interleaved, so both see the same machine load
        for b in batch_sizes:
            for row, m in zip(out, (dense, small)):
                row[f"latency_ms_b{b}"] = measure_latency(m, example_input, batch_sizes=(b,), repeats=repeats).ms[b]
    return out[0], out[1]


def check_outputs(masked: nn.Module, small: nn.Module, x: Tensor, tolerance: float = OUTPUT_TOLERANCE) -> tuple[float, float]:
    diff, scale = output_difference(masked, small, x)
    if not diff <= tolerance * max(scale, 1e-12):
        raise RuntimeError(f"the compact model's outputs differ from the masked model's by {diff:.3g} (output scale "
                           f"{scale:.3g}): some coupling in this architecture is not followed exactly. Please report it "
                           "with the model; the session is unchanged")
    return diff, scale


def compact_state(state: "PruningState", example: Tensor, measure: bool = True, device: str = "cpu") -> tuple[nn.Module, Any]:
    """The physically smaller copy of ``state`` 's model (every removed channel and block taken
    out, the other masks kept as zeros), checked against the masked model on ``example``; with
    ``measure``, the :class:`CompactReport` of both (else None). ``state.groups`` must be found."""
    if state.in_trial:
        raise RuntimeError("cannot compact while a sweep holds trial masks in the model; stop the sweep first")
    with state.lock:
        channels = state.channels
        if not channels:
            raise ValueError("no channels are removed, so compact() would return the same shapes: prune with "
                             "set_sparsity({layer: s}, pattern='channels') (or set_global_sparsity(..., pattern='channels'))")
        groups = state.groups
        removed = {groups.groups[g].root_module: torch.nonzero(~c.keep).flatten().tolist() for g, c in channels.items()
                   if g in groups.groups}
        blocks = [g for g in channels if g in groups.blocks]
        heads = {g: torch.nonzero(~c.keep).flatten().tolist() for g, c in channels.items() if g in groups.heads}
        small = compact_copy(state.model, removed, example, blocks, heads)
        diff, scale = check_outputs(state.model, small, example)
        report = None
        if measure:
            dense_row, small_row = measure_pair(state.model, small, example)
            report = CompactReport(dense_row, small_row, diff, scale, device=device)
    return small, report


def semi_structured(state: "PruningState") -> nn.Module:
    """A copy whose Linear layers pruned with a semi-structured pattern (2:4) hold
    ``torch.sparse.to_sparse_semi_structured`` weights (CUDA, compute capability >= 8.0;
    elsewhere a RuntimeError says why)."""
    from ..patterns import get_pattern
    from ..runtime import to_semi_structured

    if state.in_trial:
        raise RuntimeError("cannot compact while a sweep holds trial masks in the model; stop the sweep first")
    eligible = [i.param.rsplit(".", 1)[0] for i in state.layers
                if get_pattern(state.record(i.name).pattern).semi_structured and i.kind == "Linear"
                and i.param.endswith(".weight")]
    if not eligible:
        raise ValueError("no Linear layer is pruned 2:4: set_sparsity({...: 0.5}, pattern='2:4') first")
    model, _ = to_semi_structured(state.model, eligible)
    return model

