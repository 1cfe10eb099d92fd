"""Widget tests: the Lab driven through real ipywidgets objects, no browser."""
from __future__ import annotations

import re


def value_of(label) -> str:
    """The number a Lab label shows (the text of its ``prune-lab-value`` span)."""
    return re.search(r"class='prune-lab-value'>([^<]*)<", label.value).group(1)


def sweep_stopped_after(lab, points: int, levels) -> None:
    """Run the Lab's sensitivity sweep and click Stop when its progress bar reaches ``points``."""
    def click_stop(change):
        if change["new"] == points:
            lab.stop_button.click()

    lab.progress.observe(click_stop, names="value")
    try:
        lab.run_sensitivity(levels=levels)
    finally:
        lab.progress.unobserve(click_stop, names="value")
