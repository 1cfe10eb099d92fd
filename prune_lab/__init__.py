"""prune_lab: see, measure and undo neural-network pruning, from a notebook or a script."""
from __future__ import annotations

from typing import Any

from . import criteria, datasets, formats, granularity, masks, metrics, models, slimming, sparse_kernels
from .workflows import distributed
from ._version import __version__
from .allocation import list_allocations, register_allocation
from .criteria import list_criteria, register_criterion
from .export import load_recipe, load_state_dict
from .lab_model import LabModel
from .layers import Coverage, LayerInfo
from .models import demo, train
from .patterns import get_pattern, list_patterns, register_pattern
from .onnx_export import OnnxExport, export_onnx
from .runtime import int8_dynamic, latency
from .session import Session
from .state import Event, Snapshot
from .workflows.compact import load_compact, save_compact

__all__ = [
    "Session", "LayerInfo", "Coverage", "Snapshot", "Event", "LabModel", "demo", "train", "datasets", "models", "criteria", "masks", "metrics",
    "granularity", "slimming", "sparse_kernels", "distributed", "formats", "latency", "int8_dynamic", "export_onnx", "OnnxExport",
    "load_recipe", "load_state_dict", "save_compact", "load_compact", "register_criterion", "register_allocation",
    "register_pattern", "get_pattern", "list_patterns", "list_criteria", "list_allocations", "plots", "Lab", "__version__",
]


def __getattr__(name: str) -> Any:
    # matplotlib and ipywidgets load only when a plot or the Lab is used
    import importlib

    if name == "plots":
        return importlib.import_module(".plots", __name__)
    if name == "Lab":
        return importlib.import_module(".widgets", __name__).Lab
    raise AttributeError(f"module 'prune_lab' has no attribute {name!r}")
