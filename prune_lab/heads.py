"""Attention heads as channel groups: which tensor entries one head owns, and removing heads.

A head of multi-head attention owns ``head_dim`` rows of each of the query, key and value
projections (and their biases) and the same ``head_dim`` input columns of the output
projection. Masking all of them makes the head's queries, keys and values zero, so its
attention is uniform over zero values and it adds nothing: the model computes exactly what the
same model with that head physically removed computes. So a head group is an ordinary
:class:`~prune_lab.groups.ChannelGroup` whose "channels" are heads (``size``: the head count),
and the pruning state masks it like any channel group.

Two layouts are found:

- ``nn.MultiheadAttention`` (packed ``in_proj_weight``, the same embedding for q, k and v; no
  ``bias_k`` or ``add_zero_attn``). Its compact form is a :class:`PrunedMultiheadAttention`
  (same call signature) since ``nn.MultiheadAttention`` needs ``heads * head_dim == embed_dim``.
- A module with four ``nn.Linear`` children named as in GPT-2/BERT/ViT/LLaMA code (``q k v o``,
  ``q_proj k_proj v_proj o_proj|out_proj``, ``query key value out|proj``) and an integer head
  count attribute (``heads``, ``num_heads``, ``n_head``, ``n_heads``, ``num_attention_heads``).
  Its compact form is the same module with sliced Linear layers and the count lowered; its
  forward must take the head size from the projections, not ``width // heads``.

Every head group is checked on the example input when found: removing its first head must
compute what masking it computes. A module that fails is listed in ``Groups.heads_excluded``
with the reason, and is not offered.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .groups import ChannelGroup, Member, _example, masked_first_class
from .measure import OUTPUT_TOLERANCE, output_difference

HEAD_COUNT_ATTRS = ("heads", "num_heads", "n_head", "n_heads", "num_attention_heads")
PROJECTION_NAMES = (("q", "k", "v", "o"), ("q_proj", "k_proj", "v_proj", "o_proj"),
                    ("q_proj", "k_proj", "v_proj", "out_proj"), ("query", "key", "value", "out"),
                    ("query", "key", "value", "proj"))


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with ``num_heads * head_dim`` smaller than ``embed_dim``: the
    compact form of one whose heads were removed. Same call and same outputs; the attention
    weights it returns (``need_weights``) average over the heads that remain. It keeps
    ``nn.TransformerEncoderLayer`` off its fused path (``_qkv_same_embed_dim`` is False), which
    assumes the full width."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, kept: Sequence[int], dropout: float = 0.0,
                 bias: bool = True, batch_first: bool = False):
        nn.Module.__init__(self)
        inner = num_heads * head_dim
        self.embed_dim, self.kdim, self.vdim, self._qkv_same_embed_dim = embed_dim, embed_dim, embed_dim, False
        self.num_heads, self.head_dim, self.dropout, self.batch_first = num_heads, head_dim, dropout, batch_first
        self.kept = [int(h) for h in kept]  # the original indices of the heads that remain (3-D masks index them)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            self.register_parameter(n, None)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, t, s, h, dh = query.shape[0], query.shape[1], key.shape[1], self.num_heads, self.head_dim
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, wq, bq).view(b, t, h, dh).transpose(1, 2)
        k = F.linear(key, wk, bk).view(b, s, h, dh).transpose(1, 2)
        v = F.linear(value, wv, bv).view(b, s, h, dh).transpose(1, 2)
        bias = self._bias(attn_mask, key_padding_mask, b, t, s, q.dtype)
        if not need_weights:  # PyTorch's fused attention kernels
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
            return self._out(y, batched), None
        logits = q @ k.transpose(-2, -1) / math.sqrt(dh) + (0.0 if bias is None else bias)
        weights = F.dropout(logits.softmax(-1), self.dropout, self.training)
        w = weights.mean(1) if average_attn_weights else weights
        return self._out(weights @ v, batched), (w if batched else w.squeeze(0))

    def _out(self, y: Tensor, batched: bool) -> Tensor:
        b, h, t, dh = y.shape
        out = self.out_proj(y.transpose(1, 2).reshape(b, t, h * dh))
        if not batched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)

    def _bias(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], b: int, t: int, s: int,
              dtype: torch.dtype) -> Optional[Tensor]:
        """The additive mask (b or 1, heads or 1, t, s), None without masks: True in a bool mask
        means "not attended" (as nn.MultiheadAttention; the opposite of SDPA's bool masks)."""
        def additive(m: Tensor) -> Tensor:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) if m.dtype == torch.bool \
                else m.to(dtype)
        if attn_mask is None and key_padding_mask is None:
            return None
        bias = torch.zeros(1, 1, t, s, dtype=dtype, device=self.in_proj_weight.device)
        if attn_mask is not None:
            m = additive(attn_mask)
            bias = bias + (m.view(b, -1, t, s)[:, self.kept] if m.dim() == 3 else m.view(1, 1, t, s))
        if key_padding_mask is not None:
            bias = bias + additive(key_padding_mask).view(b, 1, 1, s)
        return bias


def _linear_quad(module: nn.Module) -> Optional[tuple[str, str, str, str]]:
    for names in PROJECTION_NAMES:
        if all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
            return names
    return None


def _head_count(module: nn.Module) -> Optional[str]:
    return next((a for a in HEAD_COUNT_ATTRS if isinstance(getattr(module, a, None), int)
                 and not isinstance(getattr(module, a), bool)), None)


def _key(module: str, rest: str) -> str:
    return f"{module}.{rest}" if module else rest


def _roots(n: int, head_dim: int, period: Optional[int] = None) -> Tensor:
    j = torch.arange(n)
    return (j % period if period else j) // head_dim


def _group(name: str, heads: int, members: list[tuple[str, int, Tensor, str]], producers: list[str],
           layers: list[str]) -> ChannelGroup:
    return ChannelGroup(name, heads, tuple(producers), tuple(dict.fromkeys(producers + layers)),
                        tuple(Member(k, d, r, role) for k, d, r, role in members), name)


def _mha_group(name: str, m: nn.MultiheadAttention, layer_of: Mapping[str, str]) -> tuple[Optional[ChannelGroup], str]:
    if m.in_proj_weight is None:
        return None, "separate q/k/v input sizes (kdim/vdim) are not supported for heads"
    if m.bias_k is not None or m.add_zero_attn:
        return None, "bias_k/bias_v or add_zero_attn attend to extra positions that no head mask removes"
    h, dh = m.num_heads, m.head_dim
    inner = m.in_proj_weight.shape[0] // 3
    members = [(_key(name, "in_proj_weight"), 0, _roots(3 * inner, dh, inner), "out"),
               (_key(name, "out_proj.weight"), 1, _roots(inner, dh), "in")]
    if m.in_proj_bias is not None:
        members.insert(1, (_key(name, "in_proj_bias"), 0, _roots(3 * inner, dh, inner), "out"))
    layers = [layer_of[k] for k, *_ in members if k in layer_of]
    return _group(name, h, members, [layer_of.get(_key(name, "in_proj_weight"), _key(name, "in_proj_weight"))], layers), ""


def _linear_group(name: str, m: nn.Module, quad: tuple[str, ...], count: str,
                  layer_of: Mapping[str, str]) -> tuple[Optional[ChannelGroup], str]:
    h = getattr(m, count)
    q, k, v, o = (getattr(m, n) for n in quad)
    inner = q.out_features
    if h < 1 or inner % h or k.out_features != inner or v.out_features != inner or o.in_features != inner:
        return None, (f"{quad[0]}/{quad[1]}/{quad[2]} give {q.out_features}/{k.out_features}/{v.out_features} features and "
                      f"{quad[3]} reads {o.in_features}: not {h} equal heads (grouped-query attention is not supported)")
    dh = inner // h
    members = []
    for n, lin in zip(quad[:3], (q, k, v)):
        members.append((_key(name, f"{n}.weight"), 0, _roots(inner, dh), "out"))
        if lin.bias is not None:
            members.append((_key(name, f"{n}.bias"), 0, _roots(inner, dh), "out"))
    members.append((_key(name, f"{quad[3]}.weight"), 1, _roots(inner, dh), "in"))
    layers = [layer_of[k] for k, *_ in members if k in layer_of]
    producers = [layer_of[_key(name, f"{n}.weight")] for n in quad[:3] if _key(name, f"{n}.weight") in layer_of]
    return _group(name, h, members, producers, layers), ""


def find_heads(model: nn.Module, layers: Sequence[Any], example_input: Any) -> tuple[dict[str, ChannelGroup], dict[str, str]]:
    """``(head groups by attention module name, excluded attention modules: why)``; each group
    checked on ``example_input`` (removing its first head computes what masking it computes)."""
    layer_of = {i.param: i.name for i in layers}
    found: dict[str, ChannelGroup] = {}
    excluded: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            grp, why = _mha_group(name, m, layer_of)
        elif (quad := _linear_quad(m)) is not None and (count := _head_count(m)) is not None:
            grp, why = _linear_group(name, m, quad, count, layer_of)
        else:
            continue
        if grp is None:
            excluded[name] = why
        elif grp.size < 2:
            excluded[name] = "it has one head, which must stay"
        else:
            found[name] = grp
    for name in list(found):
        why = _unfaithful(model, found[name], example_input)
        if why:
            excluded[name] = why
            del found[name]
    return found, excluded


def _unfaithful(model: nn.Module, group: ChannelGroup, example_input: Any) -> str:
    """Why removing head 0 of ``group`` does not compute what masking it does ("" when it does)."""
    masked, (keep,) = masked_first_class(model, [group])
    small = copy.deepcopy(model)
    try:
        remove_heads(small, {group.name: (~keep).nonzero().flatten().tolist()})
        diff, scale = output_difference(masked, small, _example(example_input))
    except Exception as e:
        return f"its forward fails with a head removed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not diff <= OUTPUT_TOLERANCE * max(scale, 1e-12):
        return (f"with a head removed it does not compute what the masks compute (difference {diff:.3g}, scale {scale:.3g}); "
                "does its forward take the head size from the model width?")
    return ""


def _slice_linear(lin: nn.Linear, idx: Tensor, dim: int) -> nn.Linear:
    weight = lin.weight.detach().index_select(dim, idx.to(lin.weight.device))
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=lin.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if lin.bias is not None:
            out.bias.copy_(lin.bias.detach() if dim == 1 else lin.bias.detach().index_select(0, idx.to(lin.bias.device)))
    out.train(lin.training)
    return out


def _kept_rows(heads: int, head_dim: int, removed: Sequence[int]) -> tuple[list[int], Tensor]:
    gone = set(int(h) for h in removed)
    bad = [h for h in gone if not 0 <= h < heads]
    if bad or len(gone) >= heads:
        raise ValueError(f"cannot remove heads {sorted(gone)} of {heads} (indices 0..{heads - 1}; at least one stays)")
    kept = [h for h in range(heads) if h not in gone]
    return kept, torch.tensor([h * head_dim + j for h in kept for j in range(head_dim)], dtype=torch.long)


def _remove_mha(m: nn.MultiheadAttention, removed: Sequence[int]) -> PrunedMultiheadAttention:
    inner = m.in_proj_weight.shape[0] // 3
    kept, rows = _kept_rows(m.num_heads, m.head_dim, removed)
    prior = getattr(m, "kept", list(range(m.num_heads)))
    p = m.in_proj_weight
    small = PrunedMultiheadAttention(m.embed_dim, len(kept), m.head_dim, [prior[h] for h in kept], m.dropout,
                                     m.in_proj_bias is not None, m.batch_first).to(device=p.device, dtype=p.dtype)
    packed = torch.cat([rows + i * inner for i in range(3)])
    with torch.no_grad():
        small.in_proj_weight.copy_(p.detach()[packed.to(p.device)])
        if m.in_proj_bias is not None:
            small.in_proj_bias.copy_(m.in_proj_bias.detach()[packed.to(p.device)])
    small.out_proj = _slice_linear(m.out_proj, rows, 1)
    small.train(m.training)
    return small


def remove_heads(model: nn.Module, removed: Mapping[str, Sequence[int]]) -> nn.Module:
    """Physically remove heads (in place): for each attention module name, the head indices
    to drop (indices of the module as it is)."""
    for name, idxs in removed.items():
        if not idxs:
            continue
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"no module {name!r} in {type(model).__name__} (another architecture?)") from None
        if isinstance(m, nn.MultiheadAttention):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, _remove_mha(m, idxs))
            continue
        quad, count = _linear_quad(m), _head_count(m)
        if quad is None or count is None:
            raise ValueError(f"module {name!r} is not an attention module whose heads prune_lab can remove")
        heads = getattr(m, count)
        dh = getattr(m, quad[0]).out_features // heads
        kept, rows = _kept_rows(heads, dh, idxs)
        for n in quad[:3]:
            setattr(m, n, _slice_linear(getattr(m, n), rows, 0))
        setattr(m, quad[3], _slice_linear(getattr(m, quad[3]), rows, 1))
        if getattr(m, "all_head_size", None) == heads * dh:
            m.all_head_size = len(kept) * dh
        setattr(m, count, len(kept))
    return model


__all__ = ["PrunedMultiheadAttention", "find_heads", "remove_heads", "HEAD_COUNT_ATTRS", "PROJECTION_NAMES"]
