"""Widget tests: the Lab driven through real ipywidgets objects, no browser."""
from __future__ import annotations

import re


def value_of(label) -> str:
    """The number a Lab label shows (the text of its ``prune-lab-value`` span)."""
    return re.search(r"class='prune-lab-value'>([^<]*)<", label.value).group(1)
