"""Where prune_lab keeps what it can rebuild (the trained demo model, trade-off results)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$PRUNE_LAB_CACHE``, else ``$XDG_CACHE_HOME/prune_lab``, else ``~/.cache/prune_lab``."""
    env = os.environ.get("PRUNE_LAB_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "prune_lab"
