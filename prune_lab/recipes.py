"""Recipes: a pruning state as JSON that rebuilds it on a fresh copy of the model (per layer its
pattern, count, criterion, seed and bits; the channel keep-masks; mask bits where a criterion
cannot be recomputed), and applying one, checked first and written at once."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import Tensor

from ._version import __version__
from .export import RECIPE_FORMAT, pack_mask, unpack_mask, weights_digest
from .state import PruningState

def build_recipe(state: PruningState, model_name: str, masks: Optional[bool] = None) -> dict[str, Any]:
    """The state as a recipe (see ``Session.recipe``): per layer its pattern, count, sparsity,
    criterion, seed (and bits); the channel keep-masks; mask bits where a criterion cannot be
    recomputed from the recipe alone, or for every layer with ``masks=True``."""
    layers = {}
    for i in state.layers:
        r = state.record(i.name)
        entry: dict[str, Any] = {"shape": list(i.shape), "pattern": r.pattern, "pruned": r.count,
                                 "sparsity": r.count / i.n_params, "criterion": r.criterion, "seed": r.seed}
        if r.mask is not None and (masks or (masks is None and not r.reproducible)):
            entry["mask"] = pack_mask(r.mask)
        if r.calibration and r.count:
            entry["calibration_sha256"] = r.calibration.split("/")[0]  # the data its statistics came from
        if r.bits is not None:
            entry["bits"], entry["quant_method"] = r.bits, r.qmethod
        if r.reconstruct and r.values is not None:  # refitted again from the mask and calibration when applied
            entry["reconstruct"], entry["values_sha256"] = r.reconstruct, weights_digest([r.values])
        layers[i.name] = entry
    recipe = {
        "prune_lab_recipe": RECIPE_FORMAT,
        "prune_lab_version": __version__,
        "model": model_name,
        "seed": state.seed,
        "weights_sha256": weights_digest([state.base(i.name) for i in state.layers]),
        "layers": layers,
    }
    if state.channels:  # the channel keep-masks, always stored: a few bytes per group
        recipe["channels"] = {g: {"size": c.size, "removed": c.count, "criterion": c.criterion, "seed": c.seed,
                                  "keep": pack_mask(c.keep)} for g, c in state.channels.items()}
    return recipe


def _check_recipe_layers(state: PruningState, layers: Mapping[str, Any]) -> None:
    from .registry import close_names

    names = [i.name for i in state.layers]
    for name, entry in layers.items():
        if name not in names:
            raise ValueError(f"recipe layer {name!r} is not in this model (another architecture?).{close_names(name, names)}")
        if tuple(entry["shape"]) != state.info(name).shape:
            raise ValueError(f"recipe layer {name!r} has shape {tuple(entry['shape'])} but the model's is "
                             f"{state.info(name).shape} (another architecture?)")
    missing = [n for n in names if n not in layers]
    if missing:
        raise ValueError(f"recipe has no entry for layer(s) {', '.join(missing)} of this model (another architecture?)")


def _recipe_keeps(state: PruningState, channels: Any) -> dict[str, Tensor]:
    if not isinstance(channels, Mapping):
        raise ValueError("recipe 'channels' must be an object of group name -> settings")
    keeps = {}
    for g, entry in channels.items():
        groups = state.groups
        if groups is None or not groups.has(g) or groups.get(g).size != entry.get("size"):
            known = {} if groups is None else {n: grp.size for n, grp in groups.groups.items()}
            raise ValueError(f"recipe channel group {g!r} ({entry.get('size')} channels) is not in this model; its groups: "
                             f"{known}")
        keeps[g] = unpack_mask(entry["keep"], (entry["size"],))
    return keeps


def apply_recipe(state: PruningState, data: Mapping[str, Any]) -> None:
    """Reproduce a (loaded) recipe's masks, bits and channels on ``state``: everything is
    checked and computed first, then written at once. Channel groups must be found already
    (``channels.ensure_groups``) when the recipe or the state has channels."""
    import warnings

    from .criteria import Criterion, get_criterion
    from .patterns import get_pattern

    layers = data["layers"]
    _check_recipe_layers(state, layers)
    channels = data.get("channels") or {}
    keeps = _recipe_keeps(state, channels)
    records = {}
    weight_dependent = False
    device = next(iter(state.weights.values())).device
    for name, entry in layers.items():
        pattern = entry.get("pattern", "unstructured")
        if get_pattern(pattern).grouped:
            continue  # rebuilt from the recipe's channel groups
        seed = int(entry.get("seed", data.get("seed", 0)))
        given = None
        if "mask" in entry:
            given = {name: unpack_mask(entry["mask"], state.info(name).shape).to(device)}
            crit = Criterion(entry["criterion"], lambda w, **_: w, reproducible=False)
        else:
            crit = get_criterion(entry["criterion"])  # unknown names fail here, before any change
            weight_dependent |= crit.weight_dependent and entry["pruned"] > 0
        records.update(state.compute({name: entry["pruned"]}, crit, seed, given, pattern, over_channels=True,
                                     reconstruct=entry.get("reconstruct", "")))
        if "values_sha256" in entry and weights_digest([records[name].values]) != entry["values_sha256"]:
            warnings.warn(f"layer {name!r}: its refitted weights differ from the recipe's (another calibration set or "
                          "machine); the mask is the recipe's", stacklevel=3)
    new_channels: dict = {}
    if channels or state.channels:  # the recipe's channel records, as stored; their layer masks derived
        start = {g: state.channel_record(g, keeps[g], int(e["removed"]), str(e.get("criterion", "l1")), int(e.get("seed", 0)))
                 for g, e in channels.items()}
        new_channels, channel_records = state.compute_channels({}, lambda g: keeps[g], "", 0, replace_unstructured=True,
                                                               start=start)
        records.update({n: r for n, r in channel_records.items() if r.grouped or n not in records})
    if weight_dependent and data.get("weights_sha256") not in (None, weights_digest([state.base(i.name) for i in state.layers])):
        warnings.warn("the recipe was made on different weights; magnitude masks depend on the weights, so they will differ",
                      stacklevel=3)
    records = {n: state.with_quant(r, (layers[n]["bits"], layers[n]["quant_method"]) if "bits" in layers[n] else None)
               for n, r in records.items()}
    state.apply_channels(new_channels, records, "restore")
