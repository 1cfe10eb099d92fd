"""One number format per kind, for every label, table and plot: percent, bytes, counts, ratios."""
from __future__ import annotations


def fmt_bytes(n: float) -> str:
    """Bytes with a binary unit: ``83,717 B``, ``81.8 KB``, ``1.2 MB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n}"


def fmt_count(n: float) -> str:
    """A count with thousands separators: ``12,912``."""
    return f"{n:,.0f}"


def fmt_percent(fraction: float, digits: int = 2) -> str:
    """A fraction as percent: ``0.9721`` -> ``97.21%``."""
    return f"{fraction:.{digits}%}"


def fmt_ratio(x: float) -> str:
    """A compression or speedup factor: ``1.54x``."""
    return f"{x:,.2f}x"


def fmt_metric(key: str, value: float) -> str:
    return fmt_percent(value) if key == "accuracy" else f"{value:.4f}"


def fmt_delta(key: str, value: float) -> str:
    return f"{value * 100:+.2f} points" if key == "accuracy" else f"{value:+.4f}"
