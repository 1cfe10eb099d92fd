"""The README opens with exactly two set-up commands, and CI runs the second one verbatim."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", setup, re.S)]


def test_two_setup_commands():
    first, second = setup_commands()
    assert "jupyter lab --allow-root notebooks/01_weights_and_masks.ipynb" in first
    assert (ROOT / "notebooks" / "01_weights_and_masks.ipynb").exists()
    assert second.endswith("-m pytest")


def test_ci_calls_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_commands()[1] in ci_lines
