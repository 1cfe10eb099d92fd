"""The stats table: per layer and total counts, bytes and MACs, all counted in live tensors."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import Tensor

from .measure import WeightUse, count_macs

if TYPE_CHECKING:
    from .state import PruningState


class NonzeroCounter:
    """``count_nonzero`` per tensor, cached until the tensor is written (version counter)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[Tensor, int, int]] = {}

    def __call__(self, t: Tensor) -> int:
        key = id(t)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is t and hit[1] == t._version:
            return hit[2]
        nnz = int(torch.count_nonzero(t.detach()))
        self._cache[key] = (t, t._version, nnz)
        return nnz


class Stats:
    """``stats.layers[name][key]`` and ``stats.total[key]``; prints as a table."""

    def __init__(self, layers: dict[str, dict[str, Any]], total: dict[str, Any], compact: Any = None):
        self.layers = layers
        self.total = total
        self.compact = compact  # a CompactReport: measured dense vs compact, when compact() ran on these masks
        self.speed: list[str] = []  # what the theoretical speedup means on this runtime (``speed_notes``)

    def __getitem__(self, key: str) -> Any:
        return self.total if key == "total" else self.layers[key]

    def as_dict(self) -> dict[str, Any]:
        out = {"layers": self.layers, "total": self.total}
        if self.compact is not None:
            out["compact"] = {"dense": self.compact.dense, "compact": self.compact.compact, "ratios": self.compact.ratios()}
        return out

    def __repr__(self) -> str:
        width = max([20] + [len(n) + 2 for n in self.layers])
        bits = any(r.get("bits") for r in self.layers.values())  # a column only when something is quantized
        head = (f"{'layer':<{width}}{'params':>10}{'nonzeros':>10}{'sparsity':>9}" + (f"{'bits':>6}" if bits else "")
                + f"{'bytes':>10}{'sparse B':>10}{'MACs':>13}{'eff. MACs':>13}")
        lines = [head]
        for name, r in list(self.layers.items()) + [("total", self.total)]:
            b = r.get("bits")
            lines.append(
                f"{name or '(model)':<{width}}{r['params']:>10,}{r['nonzeros']:>10,}{r['sparsity']:>9.1%}"
                + (f"{(b if b else ('' if name == 'total' else r['dense_bytes'] * 8 // max(r['params'], 1))):>6}" if bits else "")
                + f"{r['dense_bytes']:>10,}{r['sparse_bytes']:>10,}{r['macs']:>13,}{r['effective_macs']:>13,}"
            )
        t = self.total
        lines.append(
            f"files: dense {t['dense_file_bytes']:,} B, sparse {t['sparse_file_bytes']:,} B "
            f"({t['file_compression']:.2f}x); compression {t['compression']:.2f}x; speedup {t['speedup']:.2f}x (theoretical)"
        )
        if self.compact is not None:
            lines.append(f"measured after compact(): {self.compact!r}")
        lines += [f"  {note}" for note in self.speed[1:]]
        return "\n".join(lines)


def compute_stats(model: torch.nn.Module, layers: list, weights: Mapping[str, Tensor], uses: Mapping[str, list[WeightUse]],
                  nonzeros: NonzeroCounter, dense_file_bytes: int, entries: list[dict],
                  bits: Optional[Mapping[str, Optional[int]]] = None) -> Stats:
    """Per layer: params, nonzeros, sparsity, dense bytes, sparse bytes (its share of the
    compressed export: Huffman-coded gaps, values or codes and codebook), MACs and effective MACs
    per input sample; totals add the file sizes of the dense and compressed exports (exact).
    ``entries``: the compressed export's header entries (``compress.Planner``)."""
    from .compress import file_size, payload_bytes

    by_key = {e["key"]: e for e in entries}
    rows: dict[str, dict[str, Any]] = {}
    for info in layers:
        w = weights[info.name]
        nnz = nonzeros(w)
        macs, effective = count_macs(w, uses.get(info.name, []), nnz)
        rows[info.name] = {
            "params": info.n_params,
            "nonzeros": nnz,
            "sparsity": 1 - nnz / info.n_params,
            "dense_bytes": info.n_params * w.element_size(),
            "sparse_bytes": payload_bytes(by_key[info.param]),
            "bits": (bits or {}).get(info.name),
            "macs": macs,
            "effective_macs": effective,
        }
    total: dict[str, Any] = {
        key: sum(r[key] for r in rows.values())
        for key in ("params", "nonzeros", "dense_bytes", "sparse_bytes", "macs", "effective_macs")
    }
    total["sparsity"] = 1 - total["nonzeros"] / total["params"]
    all_params = {id(p): p for p in model.parameters()}.values()
    total["model_params"] = sum(p.numel() for p in all_params)
    total["model_nonzeros"] = sum(nonzeros(p) for p in all_params)
    total["dense_file_bytes"] = dense_file_bytes
    total["sparse_file_bytes"] = file_size(entries)
    total["compression"] = total["params"] / max(total["nonzeros"], 1)
    total["file_compression"] = total["dense_file_bytes"] / total["sparse_file_bytes"]
    total["speedup"] = total["macs"] / max(total["effective_macs"], 1)
    return Stats(rows, total)


class StatsTable:
    """The stats of a pruning state, kept cheap to recompute after a slider move: nonzeros are
    counted per tensor until it is written, and the compressed export's size plan is cached per
    layer value token, so only the changed layer's share of the file is recomputed."""

    def __init__(self, state: "PruningState", uses: Mapping[str, list[WeightUse]]):
        from .compress import Planner

        self.state, self.uses = state, uses
        self._nonzeros = NonzeroCounter()
        self._planner = Planner()
        self._dense_file_bytes: Optional[int] = None
        self._refit_cache: dict[str, tuple[Any, Any]] = {}

    def compressed_plan(self, parts_wanted: bool = False) -> tuple[list, list]:
        """The compressed export of the live weights: pruned or quantized layers as gaps +
        values or codes (Huffman-coded), everything else raw."""
        from .quantize import quantize

        state = self.state
        compressed, tokens = {}, {}
        for i in state.layers:
            r = state.record(i.name)
            if not r.count and r.bits is None:
                continue
            for key in (i.param, *i.aliases):
                compressed[key] = (lambda i=i, r=r: None if r.bits is None else
                                   quantize(state.base(i.name), r.mask, r.bits, r.qmethod, i.kind))
                tokens[key] = state.token(i.name)
        return self._planner.plan(state.model.state_dict(), compressed, tokens, parts_wanted)

    def dense_file_bytes(self) -> int:
        """Length of ``torch.save(model.state_dict())`` of the dense model (cached)."""
        if self._dense_file_bytes is None:
            from .export import serialize

            self._dense_file_bytes = len(serialize(self.state.original_state()))
        return self._dense_file_bytes

    def sparse_file_bytes(self) -> int:
        """Exact length of the compressed export's file for the current weights."""
        from .compress import file_size

        with self.state.lock:
            return file_size(self.compressed_plan()[0])

    def export_bytes(self, sparse: bool) -> bytes:
        """The bytes of the live model's export: ``torch.save`` of the state_dict, or the compressed file."""
        if sparse:
            from .compress import file_bytes

            with self.state.lock:
                return file_bytes(*self.compressed_plan(parts_wanted=True))
        from .export import serialize

        return serialize({k: v.detach().cpu() for k, v in self.state.model.state_dict().items()})

    def table(self) -> Stats:
        """Per layer and total: params, nonzeros, sparsity, bytes, MACs (see ``compute_stats``), and for
        refitted layers how well they fit the calibration inputs (:meth:`refit_errors`)."""
        state = self.state
        with state.lock:
            entries, _ = self.compressed_plan()
            bits = {n: r.bits for n, r in state.records.items()}
            stats = compute_stats(state.model, state.layers, state.weights, self.uses, self._nonzeros,
                                  self.dense_file_bytes(), entries, bits)
            self.refit_errors(stats)
            stats.speed = speed_notes(state, stats.total["speedup"])
            return stats

    def refit_errors(self, stats: Stats) -> None:
        """``mask_error`` and ``refit_error`` per refitted layer and in total: ||W X - W' X||^2 / ||W X||^2 over
        the calibration inputs, for the mask alone and for the refitted weights (None where nothing was refitted)."""
        totals = [0.0, 0.0, 0.0]
        for name, row in stats.layers.items():
            token = self.state.record(name).token
            hit = self._refit_cache.get(name)
            errors = hit[1] if hit is not None and hit[0] == token else self.state.refit_errors(name)
            self._refit_cache[name] = (token, errors)
            row["mask_error"] = row["refit_error"] = None
            if errors is not None:
                masked, refit, signal = errors
                row["mask_error"], row["refit_error"] = masked / max(signal, 1e-300), refit / max(signal, 1e-300)
                totals = [a + b for a, b in zip(totals, errors)]
        found = totals[2] > 0
        stats.total["mask_error"] = totals[0] / totals[2] if found else None
        stats.total["refit_error"] = totals[1] / totals[2] if found else None


def speed_notes(state: "PruningState", speedup: float) -> list[str]:
    """What the theoretical speedup (MACs / effective MACs) means on *this* runtime, per kind of
    sparsity in the state: stated from what the kernels do, never a promise (measured figures come
    from ``compact()`` and ``pl.latency``)."""
    from .patterns import get_pattern
    from .runtime import semi_structured_reason

    device = next(iter(state.weights.values())).device
    where = f"torch on {device.type}, {torch.get_num_threads()} threads"
    kinds: dict[str, list[str]] = {}
    for name, r in state.records.items():
        if r.count:
            pat = get_pattern(r.pattern)
            kind = "structured" if pat.structured else "2:4" if pat.semi_structured else "zeros"
            kinds.setdefault(kind, []).append(name)
        if r.bits is not None:
            kinds.setdefault("quantized", []).append(name)
    notes = [f"theoretical speedup {speedup:.2f}x: MACs counted, not timed"] if kinds else []
    if "zeros" in kinds:
        notes.append(f"unstructured/kernel zeros in {', '.join(kinds['zeros'])}: dense kernels still multiply them, "
                     f"so {where} runs them no faster (no gain from this part)")
    if "2:4" in kinds:
        reason = semi_structured_reason(device)
        notes.append(f"2:4 in {', '.join(kinds['2:4'])}: " + (
            "CUDA semi-structured kernels can run it here: compact(semi_structured=True), then pl.latency measures it"
            if reason is None else f"semi-structured kernels {reason}; here it runs as dense (no gain)"))
    if "structured" in kinds:
        notes.append(f"channels/blocks in {', '.join(kinds['structured'])}: faster only once removed: compact() "
                     "measures the smaller model (batch 1 and 64)")
    if "quantized" in kinds:
        notes.append("quantized values are stored as floats here (no gain in torch); pl.int8_dynamic (torch.ao) "
                     "and ONNX Runtime (pl.latency(..., runtime='onnxruntime')) time real int8 kernels")
    return notes


def describe_layers(state: "PruningState", header: str, coverage: Any) -> str:
    """The Session's text table: a header line, the coverage, then one line per prunable layer
    (kind, shape, parameters, sparsity, criterion, tied names)."""
    lines = [header, f"  {coverage!r}"]
    width = max(len(i.name) for i in state.layers)
    sparsity = state.sparsity
    for i in state.layers:
        r = state.record(i.name)
        tied = f"  tied with {', '.join(i.aliases)}" if i.aliases else ""
        lines.append(f"  {i.name:<{width}}  {i.kind:<18} {'x'.join(map(str, i.shape)):>14} {i.n_params:>10,}  "
                     f"{sparsity[i.name]:6.1%} {r.criterion if r.count else ''}{tied}")
    return "\n".join(lines)
