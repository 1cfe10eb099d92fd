"""The ipywidgets Lab. Imports plots and core only; nothing imports this package but the
top-level ``prune_lab.Lab`` accessor."""
from .lab import Lab

__all__ = ["Lab"]
