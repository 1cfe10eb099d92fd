"""Incremental evaluation: after some layers change, recompute only what depends on them.

The model is traced once with ``torch.fx`` (optional ``forward`` arguments fixed at their
defaults). Every graph node gets the set of prunable layers it depends on, by parameter
identity: a module call depends on every prunable tensor among its parameters (so an embedding
tied to the output head depends on the head's layer), a ``get_attr`` on the tensor it reads.
After a full forward, the values on the boundary between "depends on layer L" and "does not"
are cached (for every L), along with the outputs. When layers C change, only the nodes that
depend on C are recomputed, fed from the cache.

The cache is valid only for the values it was computed from: each layer's value token (see
``PruningState.token``) and the identity and version counter of every other parameter and
buffer. Anything else changed, through the state or behind its back, means a full pass. New
values are committed to the cache only after every chunk has been computed, so an interrupted
or failed evaluation leaves the cache as it was.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Optional

import torch
from torch import Tensor, fx, nn

from .measure import EvalData, eval_mode, model_logits

#: default cache budget: this fraction of the free memory of the session's device
DEFAULT_BUDGET_FRACTION = 0.25


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


class TraceError(RuntimeError):
    """The traced path cannot be used; callers fall back to full forward passes."""


@dataclass
class _Chunk:
    inputs: Tensor
    targets: Tensor
    cache: dict[str, Any] = field(default_factory=dict)  # node name -> value
    outputs: Any = None


def trace(model: nn.Module) -> fx.GraphModule:
    """``fx.symbolic_trace`` with every ``forward`` argument after the first fixed at its
    default (the evaluator calls ``model(inputs)``)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    concrete = {
        p.name: p.default for p in params[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty
    }
    required = [p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty]
    if required:
        raise TraceError(f"forward needs more than one argument ({', '.join(required)})")
    try:
        with eval_mode(model):
            return fx.symbolic_trace(model, concrete_args=concrete or None)
    except Exception as e:  # fx raises many kinds of errors for untraceable code
        raise TraceError(f"the model cannot be traced by torch.fx: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


class IncrementalEngine:
    """Outputs of ``model`` on eval data, recomputing only nodes downstream of changed layers.

    ``layer_params``: layer name -> its weight Parameter. Construction raises ``TraceError``
    when the model cannot be traced.
    """

    def __init__(self, model: nn.Module, data: EvalData, layer_params: Mapping[str, Tensor],
                 budget_bytes: Optional[int] = None, chunk_size: int = 1024):
        if data.inputs is None:
            raise TraceError("incremental evaluation needs eval data that fits in memory")
        self.graph_module = trace(model)
        self.model = model
        self.data = data
        self.layer_params = dict(layer_params)
        self.nodes = list(self.graph_module.graph.nodes)
        modules = dict(self.graph_module.named_modules(remove_duplicate=False))
        layer_of = {id(w): name for name, w in self.layer_params.items()}
        module_layers: dict[str, frozenset[str]] = {}
        for mname, m in modules.items():
            module_layers[mname] = frozenset(layer_of[id(p)] for p in m.parameters(recurse=True) if id(p) in layer_of)
        self.deps: dict[fx.Node, frozenset[str]] = {}
        for node in self.nodes:
            d: set[str] = set()
            for arg in node.all_input_nodes:
                d |= self.deps[arg]
            if node.op == "call_module":
                d |= module_layers.get(str(node.target), frozenset())
            elif node.op == "get_attr":
                attr = _fetch_attr(self.graph_module, str(node.target))
                if isinstance(attr, Tensor) and id(attr) in layer_of:
                    d.add(layer_of[id(attr)])
                elif isinstance(attr, nn.Module):
                    d |= module_layers.get(str(node.target), frozenset())
            self.deps[node] = frozenset(d)
        # boundary values: independent of layer L but used by a node that depends on L
        self.boundary = [n for n in self.nodes if n.op != "output" and any(self.deps[u] - self.deps[n] for u in n.users)]
        self._boundary_set = set(self.boundary)
        self._programs: dict[Any, tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]] = {}
        self.output_node = self.nodes[-1]
        self.inplace = {n for n in self.nodes if _is_inplace(n, modules)}
        self.budget_bytes = budget_bytes if budget_bytes is not None else int(DEFAULT_BUDGET_FRACTION * free_memory_bytes(data.device))
        self.chunk_size = chunk_size
        self.chunks: list[_Chunk] = []
        self.cached_chunks = 0
        self._tokens: Optional[dict[str, Hashable]] = None
        self._others: Any = None
        self._validated = False
        self.stats = {"full": 0, "incremental": 0, "cached": 0}

    # ------------------------------------------------------------------ change detection
    def others_signature(self) -> tuple:
        """Identity, storage and version of every parameter and buffer that is not a layer, and
        of the eval data itself (an in-place edit of the inputs invalidates the cache too)."""
        layer_ids = {id(w) for w in self.layer_params.values()}
        data = tuple((id(t), t.data_ptr(), t._version) for t in (self.data.inputs, self.data.targets))
        return data + tuple(
            (name, id(t), t.data_ptr(), t._version)
            for name, t in list(self.model.named_parameters()) + list(self.model.named_buffers())
            if id(t) not in layer_ids
        )

    def changed_layers(self, tokens: Mapping[str, Hashable]) -> Optional[frozenset[str]]:
        """Layers whose value differs from the cached one; ``None`` when the cache is unusable."""
        if self._tokens is None or self._others != self.others_signature():
            return None
        return frozenset(n for n, t in tokens.items() if self._tokens.get(n) != t)

    # ------------------------------------------------------------------ running
    def outputs(self, tokens: Mapping[str, Hashable], commit: bool = True) -> list[tuple[Any, Tensor]]:
        """``(outputs, targets)`` per chunk for the current weights, whose value tokens are
        ``tokens``. ``commit=False`` leaves the cache as it is (a trial that will be undone)."""
        changed = self.changed_layers(tokens)
        with torch.inference_mode():
            if changed is None:
                return self._full_pass(tokens, commit)
            if not changed:
                self.stats["cached"] += 1
                return [(c.outputs, c.targets) for c in self.chunks[: self.cached_chunks]] + self._uncached_tail()
            self.stats["incremental"] += 1
            program, inputs, updates = self._program(changed, commit)
            results = []
            for chunk in self.chunks[: self.cached_chunks]:
                out, new_values = program(*[chunk.cache[n.name] for n in inputs])
                results.append((chunk, out, new_values))
            tail = self._uncached_tail()
        if commit:  # only once every chunk is computed
            for chunk, out, new_values in results:
                for node, value in zip(updates, new_values):
                    chunk.cache[node.name] = value
                chunk.outputs = out
                chunk.cache[self.output_node.name] = out
            self._tokens = dict(tokens)
        return [(out, chunk.targets) for chunk, out, _ in results] + tail

    def _program(self, changed: Optional[frozenset], commit: bool) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]:
        """A compiled graph that recomputes the nodes depending on ``changed`` (all nodes when
        None) from cached inputs, returning ``(outputs, [updated boundary values])``. fx's code
        generation frees each intermediate after its last use, like an ordinary forward."""
        key = (changed, commit)
        if key in self._programs:
            return self._programs[key]
        if changed is None:
            placeholders = [n for n in self.nodes if n.op == "placeholder"]
            inputs = placeholders[:1]  # the eval inputs; the others keep their defaults
            recompute = placeholders[1:] + [n for n in self.nodes if n.op != "placeholder"]
            updates = list(self.boundary)
        else:
            recompute = [n for n in self.nodes if self.deps[n] & changed]
            rset = set(recompute)
            inputs = [n for n in self.boundary if n not in rset and any(u in rset for u in n.users)]
            updates = [n for n in self.boundary if n in rset] if commit else []
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in inputs:
            env[n] = g.placeholder(f"in_{n.name}")
        output_args = None
        for n in recompute:
            if n.op == "output":
                output_args = fx.node.map_arg(n.args[0], lambda a: env[a])
                continue
            if n.op == "placeholder":
                env[n] = g.placeholder(f"in_{n.name}", default_value=n.args[0] if n.args else None)
                continue
            if n in self.inplace and n.args and isinstance(n.args[0], fx.Node) and n.args[0] in self._boundary_set:
                # never write into a value the cache holds
                cloned = g.call_method("clone", (env[n.args[0]],))
                copy = g.node_copy(n, lambda a: cloned if a is n.args[0] else env[a])
            else:
                copy = g.node_copy(n, lambda a: env[a])
            env[n] = copy
        if output_args is None:  # the output does not depend on the changed layers
            output_args = g.placeholder("in_cached_output")
            inputs = inputs + [self.output_node]
        g.output((output_args, tuple(env[n] for n in updates)))
        program = fx.GraphModule(self.graph_module, g)
        self._programs[key] = (program, inputs, updates)
        return self._programs[key]

    def _uncached_tail(self) -> list[tuple[Any, Tensor]]:
        """Chunks beyond the memory budget: plain forward passes of the traced graph."""
        inputs, targets = self.data.inputs, self.data.targets
        start = self.cached_chunks * self.chunk_size
        return [(self.graph_module(inputs[s : s + self.chunk_size]), targets[s : s + self.chunk_size])
                for s in range(start, len(inputs), self.chunk_size)]

    def _full_pass(self, tokens: Mapping[str, Hashable], commit: bool) -> list[tuple[Any, Tensor]]:
        self.stats["full"] += 1
        others = self.others_signature()
        inputs, targets = self.data.inputs, self.data.targets
        program, _, updates = self._program(None, True)
        chunks: list[_Chunk] = []
        results: list[tuple[Any, Tensor]] = []
        used = 0
        for s in range(0, len(inputs), self.chunk_size):
            x, y = inputs[s : s + self.chunk_size], targets[s : s + self.chunk_size]
            if not commit or used > self.budget_bytes:
                out = self.graph_module(x)
                results.append((out, y))
                continue
            out, values = program(x)
            if not self._validated:
                self._validate(x, out)
            cache = {n.name: v for n, v in zip(updates, values)}
            cache[self.output_node.name] = out
            used += sum(_nbytes(v) for v in values if v is not x) + _nbytes(out)
            if used <= self.budget_bytes:
                chunks.append(_Chunk(x, y, cache, out))
            results.append((out, y))
        if commit:
            self.chunks, self.cached_chunks = chunks, len(chunks)
            self._tokens, self._others = dict(tokens), others
        return results

    def _validate(self, x: Tensor, traced: Any) -> None:
        """The traced graph must compute exactly what the model computes (first chunk)."""
        with eval_mode(self.model):
            plain = self.model(x)
        if not torch.equal(model_logits(plain), model_logits(traced)):
            raise TraceError("the traced graph's outputs differ from the model's forward")
        self._validated = True

    def cache_bytes(self) -> int:
        """Bytes held by cached activations (the eval inputs themselves not counted)."""
        return sum(_nbytes(v) for c in self.chunks for v in c.cache.values() if v is not c.inputs)


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior}


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or getattr(node.target, "__name__", "").endswith("_") or bool(node.kwargs.get("inplace"))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    return False


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _nbytes(v: Any) -> int:
    if isinstance(v, Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_nbytes(x) for x in v)
    if isinstance(v, dict):
        return sum(_nbytes(x) for x in v.values())
    return 0
