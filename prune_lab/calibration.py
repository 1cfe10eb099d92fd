"""Calibration statistics for data-aware criteria, from *training* data.

- ``act_sq``: per weight entry, the sum over calibration samples (and tokens / positions) of
  the squared input feature that entry multiplies; ``act_norm = sqrt(act_sq)`` is Wanda's
  ``||X_j||_2``. Collected at the ATen level (like MACs), so functional uses, attention's packed
  projection, Conv1D and convolutions (input channels x kernel positions) are covered.
- ``grad``: the gradient of the mean loss over the calibration samples (``taylor-meangrad``).
- ``batch_grad_sq``: the mean over minibatches b (of ``batch_size`` samples) of g_b ** 2, g_b the
  gradient of batch b's mean loss: Taylor as Molchanov et al. 2019 accumulate it,
  mean_b (g_b * w) ** 2 = w ** 2 * batch_grad_sq.
- ``xtx``: per layer the Gram matrix H = X X^T of its input columns (float64, cols x cols, columns in
  ``reconstruct.to_matrix`` order), what weight reconstruction solves with: ``8 * cols ** 2`` bytes
  per layer. nn.Linear, GPT-2's Conv1D and Conv1d/Conv2d (groups=1, zero padding) only.
- ``fisher``: the mean over samples of the squared per-sample gradient: the empirical Fisher,
  OBD's estimate of the Hessian diagonal. ``hessian="hutchinson"`` estimates the true diagonal
  instead: E[z * (H z)] over Rademacher probes z (Hutchinson 1990).

Only the statistics asked for are collected, in one forward pass (activations recorded at the
ATen level, per-sample gradients captured by module hooks) and one backward pass per batch.

Memory. Each statistic is one float32 copy of the prunable weights, and a :class:`Calibration`
keeps only those of the criterion in use (computed on first use from the stored calibration
samples, same data, same fingerprint), so it holds at most one copy unless ``criteria=`` asked
for several at once. While computing, the peak adds what one training step needs (autograd's
gradients for a batch) and per-sample gradients of one layer at a time: for a Linear applied
once per sample the Fisher is a closed form, sum_n g_n^2 (x_n^2)^T, with no per-sample copy.
Weights the hooks cannot follow (shared, tied, attention's packed projection, RNNs, raw
parameters) take a per-sample path over chunks of at most ``2**20`` gradient entries.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .criteria import STATISTICS, LayerStats
from .measure import WeightIndex, eval_mode, model_logits, unfused, weight_uses




Compute = Callable[[tuple[str, ...]], "dict[str, LayerStats]"]


def _has(stats: LayerStats, need: str) -> bool:
    return (stats.hessian if need == "fisher" else getattr(stats, need)) is not None


def _drop(stats: LayerStats, need: str) -> None:
    if need == "fisher":
        stats.fisher = stats.hessian = None
    else:
        setattr(stats, need, None)


class Calibration:
    """Statistics per layer, what they were computed from (``fingerprint`` of the samples) and
    how (``key``: base weights, device, data and settings).

    ``ensure(needs)`` computes missing statistics from the stored samples with ``compute`` and
    then drops the ones ``needs`` does not list (unless ``pinned``), so at most one criterion's
    statistics are held (see the module docstring)."""

    def __init__(self, names: Iterable[str], data: tuple[Tensor, Tensor], settings: dict[str, Any], fingerprint: str,
                 compute: Optional[Compute] = None, key: tuple = ()):
        self.layers: dict[str, LayerStats] = {n: LayerStats() for n in names}
        self.data = data  # the calibration samples (inputs, targets): what every statistic is computed from
        self.settings = dict(settings)  # batch_size, hessian, probes, seed: to compute the same elsewhere
        self.fingerprint = fingerprint
        self.key = key
        self.pinned: set[str] = set()
        self._compute = compute

    @property
    def samples(self) -> int:
        return len(self.data[0])

    @property
    def hessian(self) -> str:
        return self.settings.get("hessian", "fisher")

    @property
    def needs(self) -> tuple[str, ...]:
        """The statistics held now (for every layer)."""
        if not self.layers:
            return ()
        return tuple(n for n in STATISTICS if all(_has(s, n) for s in self.layers.values()))

    def ensure(self, needs: Iterable[str], keep: bool = False, drop: bool = True) -> None:
        """Hold ``needs``: compute what is missing (all at once, in one pass), then drop what
        ``needs`` does not list (unless ``drop`` is False), except what was kept (``keep``: held
        from now on, as ``calibrate(criteria=...)`` asks). Interrupted, it changes nothing."""
        wanted = tuple(n for n in STATISTICS if n in set(needs))
        if not wanted:
            return
        missing = tuple(n for n in wanted if n not in self.needs)
        if missing:
            if self._compute is None:
                raise ValueError(f"this calibration cannot compute {', '.join(missing)}; call calibrate(train_data) again")
            fresh = self._compute(missing)
            for name, stats in self.layers.items():
                for need in missing:
                    if need == "fisher":
                        stats.fisher, stats.hessian = fresh[name].fisher, fresh[name].hessian
                    elif need == "xtx":
                        stats.xtx, stats.kind, stats.xtx_error = fresh[name].xtx, fresh[name].kind, fresh[name].xtx_error
                    else:
                        setattr(stats, need, getattr(fresh[name], need))
        if keep:
            self.pinned |= set(wanted)
        if not drop:
            return
        for stats in self.layers.values():
            for need in STATISTICS:
                if need not in wanted and need not in self.pinned:
                    _drop(stats, need)

    def nbytes(self) -> int:
        """Bytes of the statistics held (a tensor shared by two fields counted once)."""
        seen: dict[int, int] = {}
        for st in self.layers.values():
            for t in (st.act_norm, st.grad, st.fisher, st.hessian, st.batch_grad_sq, st.xtx):
                if t is not None:
                    seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    def layer(self, name: str) -> LayerStats:
        return self.layers[name]

    def __repr__(self) -> str:
        return (f"Calibration({self.samples} samples, holding {', '.join(self.needs) or 'nothing yet'}, "
                f"hessian={self.hessian}, data {self.fingerprint[:12]})")


def data_fingerprint(x: Tensor, y: Tensor) -> str:
    h = hashlib.sha256()
    for t in (x, y):
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def as_tensors(data: Any, samples: int) -> tuple[Tensor, Tensor]:
    """The first ``samples`` (inputs, targets) of a tensor pair, Dataset or DataLoader."""
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return data[0][:samples], data[1][:samples]
    if isinstance(data, Dataset):
        data = DataLoader(data, batch_size=256)
    if not isinstance(data, DataLoader):
        raise TypeError(f"calibration data must be (inputs, targets) tensors, a Dataset or a DataLoader, got {type(data).__name__}")
    xs, ys, n = [], [], 0
    for x, y, *_ in data:
        xs.append(x)
        ys.append(y)
        n += len(x)
        if n >= samples:
            break
    if not xs:
        raise ValueError("calibration data is empty")
    return torch.cat(xs)[:samples], torch.cat(ys)[:samples]


# ---------------------------------------------------------------------- activations (Wanda)
def activation_recorder(weights: Mapping[str, Tensor], acc: dict[str, Tensor]) -> Any:
    """A dispatch mode adding, for every matrix product and convolution that reads a weight, the
    squared input features to ``acc`` (weight-shaped, float32). Active only in the forward pass."""
    aten = torch.ops.aten  # (torch < 2.3 cannot import it by name)
    from torch.utils._python_dispatch import TorchDispatchMode

    index = WeightIndex(dict(weights))
    owner = index.owner

    def add(name: str, t: Tensor, s: Tensor) -> None:
        """Add ``s`` (shaped like ``t``, or broadcastable to it) to the entries ``t`` views; dims
        along which ``t`` repeats one entry (stride 0, a broadcast weight) are summed first."""
        w = weights[name]
        s = s.expand(t.shape)
        zero = tuple(i for i, st in enumerate(t.stride()) if st == 0)
        if zero:
            s = s.sum(dim=zero, keepdim=True)
        size = tuple(1 if st == 0 else n for n, st in zip(t.shape, t.stride()))
        acc[name].as_strided(size, t.stride(), t.storage_offset() - w.storage_offset()).add_(s)

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            packet = getattr(func, "overloadpacket", None)
            if packet in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm):
                a, b = (args[0], args[1]) if packet in (aten.mm, aten.bmm) else (args[1], args[2])
                if owner(b) is not None:  # x @ W, W (.., K, N): entry (k, n) multiplies feature k of every row of x
                    add(owner(b), b, (a.float() ** 2).sum(dim=-2).unsqueeze(-1))
                if owner(a) is not None:  # W @ x, W (.., M, K): entry (m, k) multiplies row k of x
                    add(owner(a), a, (b.float() ** 2).sum(dim=-1).unsqueeze(-2))
            elif packet is aten.convolution and owner(args[1]) is not None and not args[6]:
                x, w = args[0], args[1]
                stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
                if w.dim() == 4 or w.dim() == 3:
                    x4, k = (x, tuple(w.shape[2:])) if w.dim() == 4 else (x.unsqueeze(2), (1, w.shape[2]))
                    pad = tuple(padding) if w.dim() == 4 else (0, padding[0])
                    st = tuple(stride) if w.dim() == 4 else (1, stride[0])
                    dl = tuple(dilation) if w.dim() == 4 else (1, dilation[0])
                    cols = F.unfold(x4.float(), k, dilation=dl, padding=pad, stride=st)  # (N, C*kh*kw, L)
                    s = (cols ** 2).sum(dim=(0, 2)).reshape(groups, -1)  # per group: (C/g*kh*kw)
                    per_out = s.repeat_interleave(w.shape[0] // groups, dim=0)  # (Cout, C/g*kh*kw)
                    add(owner(w), w, per_out.reshape(w.shape))
            return out

    return Recorder()


# ---------------------------------------------------------------------- gradients
LossFn = Callable[[Tensor, Tensor], Tensor]
CHUNK_ENTRIES = 1 << 20  # per-sample gradient entries held at once (4 MiB of float32)


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    if outputs.dim() == targets.dim() + 1 and tuple(outputs.shape[:-1]) == tuple(targets.shape):
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return F.cross_entropy(outputs, targets, ignore_index=-100)


def per_sample_losses(outputs: Tensor, targets: Tensor, loss_fn: LossFn) -> Tensor:
    """``loss_fn`` of each sample alone: their sum's gradient holds every per-sample gradient
    (samples do not interact in eval mode)."""
    return torch.stack([loss_fn(outputs[i : i + 1], targets[i : i + 1]) for i in range(len(outputs))])


def _chunk(entries: int) -> int:
    return max(1, CHUNK_ENTRIES // max(1, entries))


def _linear_sq(x: Tensor, g: Tensor) -> Tensor:
    """sum_n G_n^2 with G_n = sum_t g_nt x_nt^T (out, in) the per-sample gradient of a product
    ``x @ W^T``; for one position per sample, the closed form (g^2)^T (x^2)."""
    x, g = x.float(), g.float()
    if x.dim() == 2:
        return (g ** 2).t() @ (x ** 2)
    n = x.shape[0]
    x3, g3 = x.reshape(n, -1, x.shape[-1]), g.reshape(n, -1, g.shape[-1])
    acc = torch.zeros(g.shape[-1], x.shape[-1], device=x.device)
    c = _chunk(acc.numel())
    for s in range(0, n, c):
        acc += (torch.einsum("nto,nti->noi", g3[s : s + c], x3[s : s + c]) ** 2).sum(0)
    return acc


def _conv_sq(module: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """sum_n G_n^2 for a Conv1d/Conv2d: the input unfolded into (channel, kernel position)
    columns per output position, one chunk of samples at a time."""
    w = module.weight
    if w.dim() == 3:
        x, g = x.unsqueeze(2), g.unsqueeze(2)
        k, pad, st, dl = (1, w.shape[2]), (0, module.padding[0]), (1, module.stride[0]), (1, module.dilation[0])
    else:
        k, pad, st, dl = tuple(w.shape[2:]), tuple(module.padding), tuple(module.stride), tuple(module.dilation)
    groups, cout = module.groups, w.shape[0]
    n = x.shape[0]
    acc = torch.zeros(cout, w[0].numel(), device=x.device)
    c = _chunk(acc.numel())
    for s in range(0, n, c):
        cols = F.unfold(x[s : s + c].float(), k, dilation=dl, padding=pad, stride=st)  # (c, Cin*k, L)
        m = cols.shape[0]
        cols = cols.reshape(m, groups, -1, cols.shape[-1])
        go = g[s : s + c].float().reshape(m, groups, cout // groups, -1)
        acc += (torch.einsum("ngol,ngil->ngoi", go, cols).reshape(m, cout, -1) ** 2).sum(0)
    return acc.reshape(w.shape)


def _closed_form(module: nn.Module) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    """The per-sample squared-gradient formula for the module owning a weight, if it has one."""
    if isinstance(module, nn.Linear):
        return _linear_sq
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and not isinstance(module.padding, str) \
            and module.padding_mode == "zeros":
        return lambda x, g: _conv_sq(module, x, g)
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return lambda x, g: _linear_sq(x, g).t()  # GPT-2's Conv1D: x @ W, W (in, out)
    return None


class _FisherHooks:
    """Forward hooks on the modules whose weight the closed forms cover: each captures its
    input and hooks its output's gradient, which adds sum_n G_n^2 to ``acc`` during the backward
    pass. A layer whose module ran other than once in a batch is reported in ``failed``."""

    def __init__(self, owners: Mapping[str, nn.Module], acc: dict[str, Tensor]):
        self.owners, self.acc = owners, acc
        self.calls: dict[str, int] = {}
        self.failed: set[str] = set()
        self._handles: list[Any] = []

    def __enter__(self) -> "_FisherHooks":
        self.calls = {n: 0 for n in self.owners}
        for name, module in self.owners.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.failed |= {n for n, k in self.calls.items() if k != 1}

    def _hook(self, name: str) -> Callable:
        formula = _closed_form(self.owners[name])

        def forward_hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            self.calls[name] += 1
            if not isinstance(output, Tensor) or not output.requires_grad or not inputs:
                self.failed.add(name)
                return
            x = inputs[0].detach()

            def grad_hook(g: Tensor) -> None:
                if self.calls[name] == 1 and formula is not None:
                    self.acc[name] += formula(x, g.detach())

            output.register_hook(grad_hook)

        return forward_hook


def _closed_form_owners(model: nn.Module, layers: list) -> dict[str, nn.Module]:
    """Layers whose weight is its module's own ``weight``, not shared with another module, and
    read exactly once per forward by a product (weight uses recorded at the ATen level)."""
    out: dict[str, nn.Module] = {}
    for info in layers:
        path, _, attr = info.param.rpartition(".")
        if info.aliases or attr != "weight":  # tied to another name, or not a module's own weight
            continue
        module = model.get_submodule(path)
        if _closed_form(module) is not None:
            out[info.name] = module
    return out


def per_sample_sq_gradient(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, loss_fn: LossFn,
                           batch_size: int) -> dict[str, Tensor]:
    """Mean over samples of the squared per-sample gradient (the empirical Fisher diagonal),
    for any weight: vectorised with ``torch.func`` in chunks of at most ``CHUNK_ENTRIES``
    gradient entries, or one sample at a time where the model cannot be vmapped. ``params`` are
    keyed by qualified parameter name."""
    import warnings

    from torch.func import functional_call, grad, vmap

    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    frozen = {k: v.detach() for k, v in model.named_parameters(remove_duplicate=False)}
    buffers = dict(model.named_buffers())
    qualified = list(params)

    def loss_one(p: dict, xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, ({**frozen, **p}, buffers), (xi.unsqueeze(0),))
        return loss_fn(model_logits(out), yi.unsqueeze(0))

    chunk = _chunk(sum(p.numel() for p in params.values()))
    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=chunk)
    with eval_mode(model), torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap's slow paths: same result
        for s in range(0, len(x), batch_size):
            p = {n: params[n].detach() for n in qualified}
            for c in range(s, min(s + batch_size, len(x)), chunk):
                xb, yb = x[c : min(c + chunk, s + batch_size)], y[c : min(c + chunk, s + batch_size)]
                try:
                    g = per_sample(p, xb, yb)
                    for n in qualified:
                        total[n] += (g[n].float() ** 2).sum(0)
                    del g
                except Exception:  # some models cannot be vmapped: the same sums, one sample at a time
                    tensors = [params[n] for n in qualified]
                    for i in range(len(xb)):
                        loss = loss_fn(model_logits(model(xb[i : i + 1])), yb[i : i + 1])
                        for n, gi in zip(qualified, torch.autograd.grad(loss, tensors, allow_unused=True)):
                            if gi is not None:
                                total[n] += gi.float() ** 2
    return {n: t / len(x) for n, t in total.items()}


def hutchinson_diagonal(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, loss_fn: LossFn,
                        batch_size: int, probes: int, seed: int) -> dict[str, Tensor]:
    """Hutchinson's estimate of diag(H) of the mean loss: mean over Rademacher probes z of
    z * (H z), with Hessian-vector products by double backward."""
    names, tensors = list(params), list(params.values())
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    g = torch.Generator().manual_seed(seed)
    with eval_mode(model), torch.enable_grad():
        for s in range(0, len(x), batch_size):
            xb, yb = x[s : s + batch_size], y[s : s + batch_size]
            loss = loss_fn(model_logits(model(xb)), yb) * (len(xb) / len(x))
            grads = torch.autograd.grad(loss, tensors, create_graph=True)
            for _ in range(probes):
                zs = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p) for p in tensors]
                hz = torch.autograd.grad(grads, tensors, grad_outputs=zs, retain_graph=True)
                for n, z, h in zip(names, zs, hz):
                    total[n] += (z * h).float() / probes
    return total


@contextlib.contextmanager
def _requiring_grad(tensors: Iterable[Tensor]) -> Iterator[None]:
    """Frozen weights take part too: ``requires_grad`` on for the block, as it was after."""
    frozen = [t for t in tensors if not t.requires_grad]
    for t in frozen:
        t.requires_grad_(True)
    try:
        yield
    finally:
        for t in frozen:
            t.requires_grad_(False)


def collect(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, needs: Iterable[str],
            loss_fn: LossFn, batch_size: int, layers: Optional[list] = None,
            bar: Any = None) -> dict[str, dict[str, Tensor]]:
    """``{statistic: {layer: tensor}}`` for ``needs`` among act_sq ("act_norm"), "grad" (mean of
    per-sample gradients) and "fisher" (mean of their squares), over batches of
    ``batch_size``: per batch one forward pass (activations recorded, per-sample gradients
    hooked) and one backward pass. ``layers`` (LayerInfo) enable the closed forms."""
    needs = set(needs)
    want_act, want_fisher = "act_norm" in needs, "fisher" in needs
    want_bgs = "batch_grad_sq" in needs
    want_grad = "grad" in needs or want_bgs  # the per-batch gradient, summed or squared
    zeros = lambda: {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}  # noqa: E731
    act = zeros() if want_act else {}
    grad = zeros() if want_grad else {}
    bgs = zeros() if want_bgs else {}
    fisher = zeros() if want_fisher else {}
    owners = _closed_form_owners(model, layers) if (want_fisher and layers is not None) else {}
    if owners:  # a weight also read outside its module (a functional call) takes the per-sample path
        uses, _ = weight_uses(model, dict(params), x[:1])
        owners = {n: m for n, m in owners.items() if len(uses[n]) == 1}
    fallback = set(params) - set(owners) if want_fisher else set()
    hooks = _FisherHooks(owners, fisher)
    names, tensors = list(params), list(params.values())
    with (unfused(model, grad=want_grad or want_fisher) if want_act else eval_mode(model)), \
            torch.set_grad_enabled(want_grad or want_fisher), _requiring_grad(tensors):
        for s in range(0, len(x), batch_size):
            xb, yb = x[s : s + batch_size], y[s : s + batch_size]
            if not (want_grad or want_fisher):
                with activation_recorder(params, act):
                    model(xb)
            else:
                with (activation_recorder(params, act) if want_act else contextlib.nullcontext()), hooks:
                    out = model(xb)
                losses = per_sample_losses(model_logits(out), yb, loss_fn)
                grads = torch.autograd.grad(losses.sum(), tensors, allow_unused=True)
                del out, losses
                if want_grad:
                    for n, g in zip(names, grads):
                        if g is not None:
                            grad[n] += g.float()
                            if want_bgs:
                                bgs[n] += (g.double() / len(xb)).pow(2).float()  # g_b: batch b's mean-loss gradient
                del grads
            if bar is not None:
                bar.update(len(xb))
    if want_fisher:
        fallback |= hooks.failed
        if fallback:
            param_of = {i.name: i.param for i in layers or ()}
            qualified = {param_of.get(n, n): n for n in fallback}
            sq = per_sample_sq_gradient(model, {q: params[n] for q, n in qualified.items()}, x, y, loss_fn, batch_size)
            for q, n in qualified.items():
                fisher[n] = sq[q] * len(x)
        for n in fisher:
            fisher[n] /= len(x)
    for n in grad:
        grad[n] /= len(x)
    batches = -(-len(x) // batch_size)
    for n in bgs:
        bgs[n] /= batches
    return {"act_norm": act, "grad": grad, "fisher": fisher, "batch_grad_sq": bgs}


def calibrate(model: nn.Module, layers: list, weights: Mapping[str, Tensor], x: Tensor, y: Tensor, needs: Iterable[str],
              loss_fn: Optional[LossFn] = None, batch_size: int = 64, hessian: str = "fisher", probes: int = 16,
              seed: int = 0, progress: bool = True) -> dict[str, LayerStats]:
    """Compute the statistics in ``needs`` for every layer (see the module docstring): act_norm
    as sqrt(act_sq), the Hessian diagonal as the Fisher or Hutchinson's estimate."""
    from tqdm.auto import tqdm

    needs = tuple(n for n in STATISTICS if n in set(needs))
    if hessian not in ("fisher", "hutchinson"):
        raise ValueError(f"hessian must be 'fisher' or 'hutchinson', got {hessian!r}")
    loss_fn = loss_fn or default_loss
    params = {i.name: weights[i.name] for i in layers}
    stats = {i.name: LayerStats() for i in layers}
    hutch = "fisher" in needs and hessian == "hutchinson"
    pass_needs = tuple(n for n in needs if not (hutch and n == "fisher") and n != "xtx")
    total = len(x) * ((1 if pass_needs else 0) + (1 if hutch else 0) + (1 if "xtx" in needs else 0))
    bar = tqdm(total=total, desc="calibrate", unit="sample", disable=not progress, leave=False)
    try:
        if "xtx" in needs:
            grams, refused = input_grams(model, layers, x, batch_size, bar)
            for i in layers:  # a layer it cannot serve holds an empty matrix and the reason, raised if it is asked
                stats[i.name].xtx = grams.get(i.name, torch.zeros(0, 0, dtype=torch.float64))
                stats[i.name].kind, stats[i.name].xtx_error = i.kind, refused.get(i.name, "")
        if pass_needs:
            found = collect(model, params, x, y, pass_needs, loss_fn, batch_size, layers, bar)
            for n in params:
                if "act_norm" in needs:
                    stats[n].act_norm = found["act_norm"][n].sqrt_()
                if "grad" in needs:
                    stats[n].grad = found["grad"][n]
                if "batch_grad_sq" in needs:
                    stats[n].batch_grad_sq = found["batch_grad_sq"][n]
                if "fisher" in pass_needs:
                    stats[n].fisher = stats[n].hessian = found["fisher"][n]
        if hutch:
            for n, t in hutchinson_diagonal(model, params, x, y, loss_fn, batch_size, probes, seed).items():
                stats[n].hessian = t
            bar.update(len(x))
    finally:
        bar.close()
    return stats


# ---------------------------------------------------------------------- input Gram matrices (reconstruction)
GRAM_BUDGET_BYTES = 4 << 30  # the xtx statistic may hold at most this much in all (8 * cols**2 bytes per layer)


def _gram_columns(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input columns, one per row, in ``reconstruct.to_matrix`` column order."""
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return x.reshape(-1, x.shape[-1])
    w = module.weight
    x4, k = (x, tuple(w.shape[2:])) if w.dim() == 4 else (x.unsqueeze(2), (1, w.shape[2]))
    pad = tuple(module.padding) if w.dim() == 4 else (0, module.padding[0])
    st = tuple(module.stride) if w.dim() == 4 else (1, module.stride[0])
    dl = tuple(module.dilation) if w.dim() == 4 else (1, module.dilation[0])
    cols = F.unfold(x4, k, dilation=dl, padding=pad, stride=st)  # (N, C * kpos, L), channel-major
    n, c = cols.shape[0], w.shape[1]
    cols = cols.reshape(n, c, -1, cols.shape[-1]).transpose(1, 2)  # (N, kpos, C, L): the N:M groups contiguous
    return cols.reshape(n, -1, cols.shape[-1]).transpose(1, 2).reshape(-1, cols.shape[1] * c)


def gram_module(model: nn.Module, info: Any) -> nn.Module:
    """The module whose inputs a layer's Gram matrix sums, or a ValueError saying which layers can be refitted."""
    path, _, attr = info.param.rpartition(".")
    module = model.get_submodule(path) if path else model
    ok = attr == "weight" and not info.aliases and (
        isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
        or (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1 and not isinstance(module.padding, str)
            and module.padding_mode == "zeros"))
    if not ok:
        why = "tied to " + ", ".join(info.aliases) if info.aliases else f"a {info.kind}"
        raise ValueError(f"layer {info.name!r} ({why}): reconstruction refits weights from the inputs of nn.Linear, GPT-2's "
                         "Conv1D and Conv1d/Conv2d (groups=1, zero padding), which this layer is not; leave it out "
                         "(layers=...) or prune it without reconstruct")
    return module


def input_grams(model: nn.Module, layers: list, x: Tensor, batch_size: int,
                bar: Any = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Per layer, H = sum over calibration inputs of x x^T (float64, cols x cols), from forward hooks
    on the layers' modules (every call of a module adds its inputs), one forward pass, no gradients;
    and, per layer it cannot serve, why (:func:`gram_module`'s error)."""
    modules, refused = {}, {}
    for i in layers:
        try:
            modules[i.name] = gram_module(model, i)
        except ValueError as e:
            refused[i.name] = str(e)
    sizes = {n: reconstruct_columns(m) for n, m in modules.items()}
    need = sum(8 * c * c for c in sizes.values())
    if need > GRAM_BUDGET_BYTES:
        big = max(sizes, key=sizes.get)
        raise ValueError(f"reconstruction needs {need:,} bytes of input Gram matrices (layer {big!r} alone "
                         f"{8 * sizes[big] ** 2:,} B, {sizes[big]} columns), over the budget of {GRAM_BUDGET_BYTES:,} B "
                         "(calibration.GRAM_BUDGET_BYTES); leave the largest layers out (layers=...)")
    grams = {n: torch.zeros(c, c, dtype=torch.float64, device=x.device) for n, c in sizes.items()}

    def hook(name: str) -> Callable:
        def add(module: nn.Module, inputs: tuple, output: Any) -> None:
            cols = _gram_columns(module, inputs[0].detach()).to(torch.float64)
            grams[name].addmm_(cols.T, cols)
        return add

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for s in range(0, len(x), batch_size):
                model(x[s : s + batch_size])
                if bar is not None:
                    bar.update(len(x[s : s + batch_size]))
    finally:
        for h in handles:
            h.remove()
    return grams, refused


def reconstruct_columns(module: nn.Module) -> int:
    """Columns of the layer's matrix view: input features, or channels x kernel positions."""
    w = module.weight
    if type(module).__name__ == "Conv1D":
        return w.shape[0]
    return w[0].numel()


@dataclass(frozen=True, eq=False)
class CalibrationRequest:
    """What ``calibrate()`` was asked: the samples (on the model's device) and settings. The
    pruning state keeps it, so it can compute the statistics again itself when its base weights
    change (fine-tuning) before a data-aware criterion reads them."""

    x: Tensor
    y: Tensor
    batch_size: int = 64
    hessian: str = "fisher"
    probes: int = 16
    seed: int = 0
    progress: bool = True
    criteria: Optional[tuple[str, ...]] = None
    loss_fn: Optional[LossFn] = None

    @property
    def settings(self) -> dict[str, Any]:
        return dict(batch_size=self.batch_size, hessian=self.hessian, probes=self.probes, seed=self.seed)


def make_request(train_data: Any, samples: int = 512, batch_size: int = 64, criteria: Optional[Iterable[str]] = None,
                 hessian: str = "fisher", probes: int = 16, seed: int = 0, progress: bool = True,
                 device: Any = "cpu", loss_fn: Optional[LossFn] = None,
                 eval_pair: Optional[tuple[Tensor, Tensor]] = None) -> CalibrationRequest:
    """A checked :class:`CalibrationRequest` from ``calibrate()``'s arguments: the first
    ``samples`` of ``train_data`` moved to ``device``. Warns (UserWarning) when they are the
    start of ``eval_pair``, the eval data, which would make the accuracy reported optimistic."""
    import warnings

    from .criteria import get_criterion
    from .masks import check_count

    check_count(samples, "samples")
    check_count(batch_size, "batch_size")
    if hessian not in ("fisher", "hutchinson"):
        raise ValueError(f"hessian must be 'fisher' or 'hutchinson', got {hessian!r}")
    check_count(probes, "probes")
    if criteria is not None:
        criteria = tuple(criteria)
        for c in criteria:
            get_criterion(c)
    x, y = as_tensors(train_data, samples)
    x, y = x.to(device), y.to(device)
    if eval_pair is not None and eval_pair[0] is not None and len(x) <= len(eval_pair[0]):
        if data_fingerprint(eval_pair[0][: len(x)], eval_pair[1][: len(x)]) == data_fingerprint(x, y):
            warnings.warn("calibrating on the session's eval data makes the accuracy it reports optimistic; "
                          "calibrate on training data", UserWarning, stacklevel=3)
    return CalibrationRequest(x, y, batch_size, hessian, probes, seed, progress, criteria, loss_fn)


__all__ = ["Calibration", "CalibrationRequest", "make_request", "LayerStats", "calibrate", "collect", "activation_recorder", "per_sample_sq_gradient", "hutchinson_diagonal", "as_tensors", "data_fingerprint"]
