"""A sparsity slider in whole percent (0-99) whose browser view never sends back a value the
kernel set.

Why integers: ipywidgets' FloatSlider view re-reads its value from noUiSlider after every update
the kernel sends and, when noUiSlider's float arithmetic gives ``0.4600000000000001`` for the
kernel's ``0.46``, sends that back as if the user had moved the slider. While a cell drives the
Lab those messages queue behind the cell and reach the kernel late, as moves nobody made
(measured: a full run of notebook 03 ended at 46% sparsity after its last cell reset it to 0%).
The integer view rounds what noUiSlider reports and compares it with the model's value before
sending, so only the user's own moves reach the kernel.
"""
from __future__ import annotations

import numbers
from typing import Any

import ipywidgets as W
import traitlets

PERCENT_MAX = 99  # a layer cannot be pruned to 100% from a slider


class _WholePercent(traitlets.Int):
    """An int trait that refuses fractions with a message saying the unit is percent."""

    def validate(self, obj: Any, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            name = getattr(obj, "description", "") or "slider"
            raise traitlets.TraitError(
                f"{name}: {value!r} is not a whole percent; the sliders take 0-{PERCENT_MAX} "
                f"(write 90 for 90%)")
        return int(value)


class PercentSlider(W.IntSlider):
    """``value`` is the sparsity in whole percent, shown as ``46%`` (the ``%`` is drawn by the
    Lab's stylesheet after the editable readout)."""

    value = _WholePercent(0, help="sparsity in whole percent").tag(sync=True)

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("min", 0)
        kwargs.setdefault("max", PERCENT_MAX)
        kwargs.setdefault("step", 1)
        super().__init__(**kwargs)
        self.add_class("prune-lab-percent")

    @traitlets.validate("value")
    def _validate_value(self, proposal: Any) -> int:
        value = proposal["value"]
        if not self.min <= value <= self.max:
            raise traitlets.TraitError(
                f"{self.description or 'slider'}: {value}% is out of range; the slider takes {self.min}-{self.max} (percent)")
        return value


def to_percent(fraction: float) -> int:
    """The slider position for a sparsity fraction: nearest whole percent, at most 99."""
    return min(int(round(fraction * 100)), PERCENT_MAX)


# the '%' after each slider's readout; the readout itself stays a plain, editable number
STYLE = "<style>.prune-lab-percent .widget-readout::after { content: '%'; }</style>"
