"""Incremental evaluation: after some layers change, recompute only what depends on them.

The model is traced once with ``torch.fx``. Every graph node gets the set of prunable layers it
depends on. After a full forward, the values that sit on the boundary between "depends on layer
L" and "does not" are cached (for every L), along with the outputs. When layers C change, only the
nodes that depend on C are recomputed, fed from the cache. Residual adds, concatenations, layers
used twice and tied weights fall out of the dependency sets; BatchNorm runs in eval mode.

Changes are detected from the tensors' in-place version counters, so a weight written by anyone
(the Session, an optimizer, the user) is noticed: a prunable weight that changed is recomputed
incrementally, any other changed parameter or buffer invalidates the cache.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, fx, nn

from .measure import EvalData, eval_mode

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


@dataclass
class _Chunk:
    inputs: Tensor
    targets: Tensor
    cache: dict[str, Any] = field(default_factory=dict)  # node name -> value
    outputs: Optional[Tensor] = None


class IncrementalEvaluator:
    """Outputs of ``model`` on eval data, recomputing only nodes downstream of changed layers.

    ``layer_modules``: layer name -> qualified names of the modules using its weight.
    Construction raises ``TraceError`` when the model cannot be traced by torch.fx.
    """

    def __init__(
        self,
        model: nn.Module,
        data: EvalData,
        layer_modules: dict[str, list[str]],
        layer_weights: dict[str, Tensor],
        budget_bytes: Optional[int] = None,
        chunk_size: int = 1024,
    ):
        if data.inputs is None:
            raise TraceError("incremental evaluation needs eval data that fits in memory")
        try:
            with eval_mode(model):
                self.graph_module = fx.symbolic_trace(model)
        except Exception as e:  # fx raises many kinds of errors for untraceable code
            raise TraceError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        self.model = model
        self.data = data
        self.layer_weights = layer_weights
        self.nodes = list(self.graph_module.graph.nodes)
        self.modules = dict(self.graph_module.named_modules())
        module_to_layer = {m: layer for layer, mods in layer_modules.items() for m in mods}
        weight_to_layer = {id(w): layer for layer, w in layer_weights.items()}
        self.deps: dict[fx.Node, frozenset[str]] = {}
        for node in self.nodes:
            d: set[str] = set()
            for arg in node.all_input_nodes:
                d |= self.deps[arg]
            if node.op == "call_module":
                # the called module, or any prunable module inside it (a leaf like MultiheadAttention)
                prefix = f"{node.target}."
                d |= {layer for m, layer in module_to_layer.items() if m == node.target or m.startswith(prefix)}
            elif node.op == "get_attr":
                attr = _fetch_attr(self.graph_module, str(node.target))
                if isinstance(attr, Tensor) and id(attr) in weight_to_layer:
                    d.add(weight_to_layer[id(attr)])
            self.deps[node] = frozenset(d)
        # boundary values: independent of layer L but used by a node that depends on L
        self.boundary: list[fx.Node] = []
        for node in self.nodes:
            if node.op == "output":
                continue
            if any(self.deps[user] - self.deps[node] for user in node.users):
                self.boundary.append(node)
        self._boundary_set = set(self.boundary)
        self._programs: dict[Any, tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]] = {}
        self.output_node = self.nodes[-1]
        self.inplace = {n for n in self.nodes if _is_inplace(n, self.modules)}
        self.budget_bytes = budget_bytes if budget_bytes is not None else int(DEFAULT_BUDGET_FRACTION * free_memory_bytes(data.device))
        self.chunk_size = chunk_size
        self.chunks: list[_Chunk] = []
        self.cached_chunks = 0
        self._versions: dict[str, int] = {}
        self._layer_versions: dict[str, int] = {}
        self.stats = {"full": 0, "incremental": 0, "cached": 0}

    # ------------------------------------------------------------------ change detection
    def _state_versions(self) -> tuple[dict[str, int], dict[str, int]]:
        layer_ids = {id(w) for w in self.layer_weights.values()}
        others = {
            name: t._version
            for name, t in list(self.model.named_parameters()) + list(self.model.named_buffers())
            if id(t) not in layer_ids
        }
        layers = {name: w._version for name, w in self.layer_weights.items()}
        return others, layers

    def changed_layers(self) -> Optional[set[str]]:
        """Layers whose weight changed since the cache was filled; ``None``: the cache is stale."""
        if not self.chunks:
            return None
        others, layers = self._state_versions()
        if others != self._versions:
            return None
        return {name for name, v in layers.items() if self._layer_versions.get(name) != v}

    def mark_clean(self, layers: Iterable[str]) -> None:
        """Declare layers written back to exactly the values the cache was filled with (a sweep
        restoring a layer), so their version bump does not trigger recomputation."""
        if not self.chunks:
            return
        for name in layers:
            self._layer_versions[name] = self.layer_weights[name]._version

    # ------------------------------------------------------------------ running
    def outputs(self, changed: Optional[Iterable[str]] = None, update_cache: bool = True) -> Iterable[tuple[Tensor, Tensor]]:
        """Yield ``(outputs, targets)`` per chunk for the model's current weights.

        ``changed``: layers that differ from the cached state (default: detected). With
        ``update_cache=False`` the cache keeps the old state (a sweep that restores the layer).
        """
        detected = self.changed_layers()
        if detected is None:
            yield from self._full_pass()
            return
        changed_set = frozenset(detected if changed is None else set(changed) | detected)
        if not changed_set:
            self.stats["cached"] += 1
            for chunk in self.chunks:
                yield chunk.outputs, chunk.targets
            yield from self._uncached_tail()
            return
        self.stats["incremental"] += 1
        program, inputs, updates = self._program(changed_set, update_cache)
        for chunk in self.chunks[: self.cached_chunks]:
            with torch.inference_mode():
                out, new_values = program(*[chunk.cache[n.name] for n in inputs])
            if update_cache:
                for node, value in zip(updates, new_values):
                    chunk.cache[node.name] = value
                chunk.outputs = out
            yield out, chunk.targets
        if update_cache:
            self._record_versions()
        yield from self._uncached_tail()

    def _program(self, changed: Optional[frozenset], update_cache: bool) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]:
        """A compiled graph that recomputes the nodes depending on ``changed`` (all nodes when
        None) from cached inputs, returning ``(outputs, [updated boundary values])``. fx's code
        generation frees each intermediate after its last use, like an ordinary forward."""
        key = (changed, update_cache)
        if key in self._programs:
            return self._programs[key]
        if changed is None:
            recompute = [n for n in self.nodes if n.op != "placeholder"]
            inputs = [n for n in self.nodes if n.op == "placeholder"]
            updates = list(self.boundary)
        else:
            recompute = [n for n in self.nodes if self.deps[n] & changed]
            rset = set(recompute)
            inputs = [n for n in self.boundary if n not in rset and any(u in rset for u in n.users)]
            updates = [n for n in self.boundary if n in rset] if update_cache else []
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in inputs:
            env[n] = g.placeholder(f"in_{n.name}")
        output_args = None
        for n in recompute:
            if n.op == "output":
                output_args = fx.node.map_arg(n.args[0], lambda a: env[a])
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

    def _uncached_tail(self) -> Iterable[tuple[Tensor, Tensor]]:
        """Chunks beyond the memory budget: plain forward passes."""
        inputs, targets = self.data.inputs, self.data.targets
        start = self.cached_chunks * self.chunk_size
        with torch.inference_mode():
            for s in range(start, len(inputs), self.chunk_size):
                yield self.graph_module(inputs[s : s + self.chunk_size]), targets[s : s + self.chunk_size]

    def _full_pass(self) -> Iterable[tuple[Tensor, Tensor]]:
        self.stats["full"] += 1
        inputs, targets = self.data.inputs, self.data.targets
        self.chunks, self.cached_chunks = [], 0
        program, _, updates = self._program(None, True)
        used = 0
        for s in range(0, len(inputs), self.chunk_size):
            x, y = inputs[s : s + self.chunk_size], targets[s : s + self.chunk_size]
            with torch.inference_mode():
                if used > self.budget_bytes:
                    yield self.graph_module(x), y
                    continue
                out, values = program(x)
            cache = {n.name: v for n, v in zip(updates, values)}
            cache[self.output_node.name] = out
            used += sum(_nbytes(v) for v in values if v is not x) + _nbytes(out)
            if used <= self.budget_bytes:
                self.chunks.append(_Chunk(x, y, cache, out))
                self.cached_chunks += 1
            yield out, y
        self._record_versions()

    def _record_versions(self) -> None:
        self._versions, self._layer_versions = self._state_versions()

    def cache_bytes(self) -> int:
        """Bytes held by cached activations (the eval inputs themselves not counted)."""
        return sum(_nbytes(v) for c in self.chunks for k, v in c.cache.items() if v is not c.inputs)


class TraceError(RuntimeError):
    """The model cannot be traced; callers fall back to full forward passes."""


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
    return 0
