"""The compressed export (Deep Compression's storage, Han et al. 2016): for each pruned or
quantized weight, the positions of its nonzeros as gaps between them and, for its values, either
the float values or (quantized) the codes and the codebook; gaps and codes are Huffman-coded.
Everything else is stored raw. :class:`Planner` plans a state_dict's file; :func:`file_size` of
its entries is the file's exact length (computed without encoding), :func:`file_bytes` writes
it, and :func:`read_compressed` gives back the same float weights bit for bit.

Layout: ``MAGIC``, a little-endian uint32 header length, the JSON header (tensors in order, each
with its kind, shape, dtype and per-part byte counts; Huffman tables as canonical code lengths),
then each tensor's parts in header order.
"""
from __future__ import annotations

import heapq
import json
import math
import struct
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

MAGIC = b"PLDC\x01\n"
FORMAT = 1


# ---------------------------------------------------------------------- Huffman coding
def huffman_lengths(counts: Mapping[int, int]) -> dict[int, int]:
    """Code length per symbol of an optimal prefix code for ``counts`` (one symbol: length 1)."""
    items = [(c, s) for s, c in counts.items() if c > 0]
    if not items:
        return {}
    if len(items) == 1:
        return {items[0][1]: 1}
    heap = [(c, i, (s,)) for i, (c, s) in enumerate(sorted(items, key=lambda t: t[1]))]
    heapq.heapify(heap)
    depth = {s: 0 for _, s in items}
    tie = len(heap)
    while len(heap) > 1:
        c1, _, a = heapq.heappop(heap)
        c2, _, b = heapq.heappop(heap)
        for s in a + b:
            depth[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, a + b))
        tie += 1
    return depth


def canonical_codes(lengths: Mapping[int, int]) -> dict[int, tuple[int, int]]:
    """Canonical Huffman codes ``{symbol: (code, length)}`` from code lengths (sorted by
    (length, symbol)), so the lengths alone describe the code."""
    code, prev = 0, 0
    out: dict[int, tuple[int, int]] = {}
    for sym, ln in sorted(lengths.items(), key=lambda kv: (kv[1], kv[0])):
        code <<= ln - prev
        out[sym] = (code, ln)
        code += 1
        prev = ln
    return out


def _counts(symbols: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(symbols, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def huffman_bits(symbols: np.ndarray) -> tuple[dict[int, int], int]:
    """(code lengths, total bits) of Huffman-coding ``symbols``."""
    counts = _counts(symbols)
    lengths = huffman_lengths(counts)
    return lengths, sum(counts[s] * lengths[s] for s in counts)


def huffman_encode(symbols: np.ndarray, lengths: Mapping[int, int]) -> bytes:
    """The bitstream (MSB first, zero-padded to whole bytes)."""
    if symbols.size == 0:
        return b""
    codes = canonical_codes(lengths)
    syms = np.array(sorted(codes), dtype=np.int64)
    index = np.searchsorted(syms, symbols)
    code = np.array([codes[int(s)][0] for s in syms], dtype=np.int64)[index]
    length = np.array([codes[int(s)][1] for s in syms], dtype=np.int64)[index]
    start = np.cumsum(length) - length
    bits = np.zeros(int(length.sum()), dtype=np.uint8)
    for j in range(int(length.max())):
        on = length > j
        bits[start[on] + j] = (code[on] >> (length[on] - 1 - j)) & 1
    return np.packbits(bits).tobytes()


def huffman_decode(data: bytes, count: int, lengths: Mapping[int, int]) -> np.ndarray:
    """``count`` symbols from a :func:`huffman_encode` bitstream."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    codes = canonical_codes(lengths)
    maxlen = max(ln for _, ln in codes.values())
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).astype(np.int64)
    bits = np.concatenate([bits, np.zeros(maxlen, dtype=np.int64)])
    out = np.empty(count, dtype=np.int64)
    if maxlen <= 20:  # table lookup on a window of maxlen bits
        table_sym = np.zeros(1 << maxlen, dtype=np.int64)
        table_len = np.zeros(1 << maxlen, dtype=np.int64)
        for sym, (code, ln) in codes.items():
            lo = code << (maxlen - ln)
            table_sym[lo : lo + (1 << (maxlen - ln))] = sym
            table_len[lo : lo + (1 << (maxlen - ln))] = ln
        n = len(bits) - maxlen
        window = np.zeros(n, dtype=np.int64)
        for j in range(maxlen):
            window = (window << 1) | bits[j : j + n]
        pos = 0
        ts, tl, w = table_sym, table_len, window
        for i in range(count):
            v = w[pos]
            out[i] = ts[v]
            pos += tl[v]
        return out
    lookup = {(ln, code): sym for sym, (code, ln) in codes.items()}
    pos = 0
    for i in range(count):
        code, ln = 0, 0
        while (ln, code) not in lookup:
            code = (code << 1) | int(bits[pos])
            ln += 1
            pos += 1
        out[i] = lookup[(ln, code)]
    return out


# ---------------------------------------------------------------------- one tensor
_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                              torch.int16, torch.int8, torch.uint8, torch.bool)}  # keyed as str(dtype): "torch.float32"


def raw_bytes(t: Tensor) -> bytes:
    """A tensor's bytes, row-major, as stored in the exports."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _nbytes(bits: int) -> int:
    return (bits + 7) // 8


def plan_tensor(t: Tensor, quant: Optional[Any] = None) -> tuple[dict[str, Any], list]:
    """Header entry and payload makers for one weight stored the Deep Compression way.
    ``quant``: a ``quantize.Quantized`` whose values equal ``t`` (codes and codebook to store)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    pos = torch.nonzero(flat, as_tuple=True)[0].numpy().astype(np.int64)
    gaps = np.diff(pos, prepend=-1) if pos.size else pos
    gap_lengths, gap_bits = huffman_bits(gaps)
    entry: dict[str, Any] = {"kind": "dc", "shape": list(t.shape), "dtype": str(t.dtype), "nnz": int(pos.size),
                             "gaps": [[s, ln] for s, ln in sorted(gap_lengths.items())], "gap_bytes": _nbytes(gap_bits)}
    parts: list = [lambda: huffman_encode(gaps, gap_lengths)]
    if quant is None:
        entry["values_bytes"] = int(pos.size) * flat.element_size()
        parts.append(lambda: raw_bytes(flat[torch.from_numpy(pos)]))
    else:
        codes = quant.codes.detach().cpu().reshape(-1).numpy().astype(np.int64)[pos]
        code_lengths, code_bits = huffman_bits(codes)
        book = quant.codebook.detach().cpu().float().contiguous()
        entry.update({"quant": quant.method, "bits": quant.bits, "channel_dim": quant.channel_dim,
                      "codes": [[s, ln] for s, ln in sorted(code_lengths.items())], "code_bytes": _nbytes(code_bits),
                      "codebook": book.numel(), "codebook_bytes": book.numel() * 4})
        parts += [lambda: huffman_encode(codes, code_lengths), lambda: raw_bytes(book)]
    return entry, parts


def _decode_dc(e: Mapping[str, Any], take: Any) -> Tensor:
    shape, dtype, nnz = tuple(e["shape"]), _DTYPES[e["dtype"]], e["nnz"]
    n = math.prod(shape)
    gaps = huffman_decode(take(e["gap_bytes"]), nnz, {s: ln for s, ln in e["gaps"]})
    pos = torch.from_numpy(np.cumsum(gaps) - 1 if nnz else gaps)
    out = torch.zeros(n, dtype=dtype)
    if "quant" not in e:
        values = torch.frombuffer(bytearray(take(e["values_bytes"])), dtype=torch.uint8).view(dtype) if nnz else torch.empty(0, dtype=dtype)
        out[pos] = values
        return out.reshape(shape)
    codes = torch.from_numpy(huffman_decode(take(e["code_bytes"]), nnz, {s: ln for s, ln in e["codes"]}))
    book = torch.frombuffer(bytearray(take(e["codebook_bytes"])), dtype=torch.float32) if e["codebook"] else torch.empty(0)
    if e["quant"] == "kmeans":
        out[pos] = book.to(dtype)[codes]
    else:  # uniform: level * the scale of the weight's output channel, as quantize() computes it
        dim = e["channel_dim"]
        if len(shape) > 1:
            inner = math.prod(shape[dim + 1 :])
            channel = (pos // inner) % shape[dim]
        else:
            channel = torch.zeros_like(pos)
        out[pos] = codes.to(dtype) * book.to(dtype)[channel]
    return out.reshape(shape)


# ---------------------------------------------------------------------- a whole state_dict
class Planner:
    """Header entries and payload makers of a state_dict's compressed export, cached per tensor
    by a caller-given token (a layer's value token: equal tokens, equal values), so sizes after
    a change cost only the changed layers. A tensor sharing another's storage (a tied weight) is
    stored once: later keys are aliases."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Any, dict]] = {}

    def plan(self, state_dict: Mapping[str, Tensor], compressed: Mapping[str, Any],
             tokens: Optional[Mapping[str, Any]] = None, parts_wanted: bool = False) -> tuple[list[dict], list]:
        """``compressed``: keys stored the Deep Compression way, each with a callable giving its
        ``Quantized`` (or None). ``tokens``: per compressed key, a value token for the cache."""
        entries, parts = [], []
        seen: dict[tuple, str] = {}
        for key, t in state_dict.items():
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
                if t.numel() else None
            if ident is not None and ident in seen:
                entry, makers = {"kind": "alias", "of": seen[ident]}, []
            elif key in compressed:
                token = None if (tokens is None or parts_wanted) else tokens.get(key)
                hit = self._cache.get(key)
                if token is not None and hit is not None and hit[0] == token:
                    entry, makers = dict(hit[1]), []
                else:
                    entry, makers = plan_tensor(t, compressed[key]())
                    if token is not None:
                        self._cache[key] = (token, dict(entry))  # entries only: payloads are rebuilt to write
            else:
                entry = {"kind": "raw", "shape": list(t.shape), "dtype": str(t.dtype), "bytes": t.numel() * t.element_size()}
                makers = [lambda t=t: raw_bytes(t)]
            if ident is not None:
                seen.setdefault(ident, key)
            entry["key"] = key
            entries.append(entry)
            parts += makers
        return entries, parts


def file_size(entries: list[dict]) -> int:
    return len(MAGIC) + 4 + len(_header(entries)) + sum(payload_bytes(e) for e in entries)


def file_bytes(entries: list[dict], parts: list) -> bytes:
    header = _header(entries)
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *(make() for make in parts)])


def _header(entries: list[dict]) -> bytes:
    return json.dumps({"prune_lab_compressed": FORMAT, "tensors": entries}, separators=(",", ":")).encode()


def payload_bytes(e: Mapping[str, Any]) -> int:
    """Bytes a header entry's tensor takes after the header."""
    if e["kind"] == "alias":
        return 0
    if e["kind"] == "raw":
        return e["bytes"]
    return e["gap_bytes"] + e.get("values_bytes", 0) + e.get("code_bytes", 0) + e.get("codebook_bytes", 0)


def read_compressed(data: bytes, source: str = "compressed export") -> dict[str, Tensor]:
    if not data.startswith(MAGIC):
        raise ValueError(f"{source} is not a prune_lab compressed export")
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    pos = len(MAGIC) + 4
    head = json.loads(data[pos : pos + hlen])
    if head.get("prune_lab_compressed", 0) > FORMAT:
        raise ValueError(f"{source}: compressed format {head['prune_lab_compressed']} is newer than this prune_lab reads "
                         f"({FORMAT}); upgrade prune_lab")
    pos += hlen

    def take(nbytes: int) -> bytes:
        nonlocal pos
        chunk = data[pos : pos + nbytes]
        if len(chunk) != nbytes:
            raise ValueError(f"{source} is truncated")
        pos += nbytes
        return chunk

    out: dict[str, Tensor] = {}
    for e in head["tensors"]:
        if e["kind"] == "alias":
            out[e["key"]] = out[e["of"]]
        elif e["kind"] == "raw":
            dtype = _DTYPES[e["dtype"]]
            raw = take(e["bytes"])
            t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype) if raw else torch.empty(0, dtype=dtype)
            out[e["key"]] = t.reshape(e["shape"]).clone()
        else:
            out[e["key"]] = _decode_dc(e, take)
    return out


__all__ = ["MAGIC", "Planner", "file_size", "file_bytes", "payload_bytes", "read_compressed", "huffman_lengths", "canonical_codes",
           "huffman_encode", "huffman_decode", "huffman_bits"]
