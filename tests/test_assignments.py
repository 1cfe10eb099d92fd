"""The nbgrader assignments (``assignments/``): the student version holds no solution, the source
earns every point on this CPU and on another, the blank version earns none with feedback that
says what to write, and a wrong submission loses exactly the points of the part it gets wrong."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "assignments"
NAME = "01_prune_by_hand"
NBGRADER = [sys.executable, "-m", "nbgrader"]
SOLUTION_LINES = ("torch.kthvalue(keys, k)", "tied = (keys == t)", "session.set_sparsity({layer: before})",
                  "pow(2).sum(dim=(0, 2, 3))", "new2.weight.copy_(c2.weight[:, keep])")
WRONG = {  # student -> (replacements in the source's solution, the grade cells that must fail)
    "largest": ({"keys = weight.detach().abs().flatten()": "keys = -weight.detach().abs().flatten()"},
                {"check_magnitude_mask"}),
    "ties_last": ({"tied = (keys == t).nonzero().flatten()": "tied = (keys == t).nonzero().flatten().flip(0)"},
                  {"check_magnitude_mask"}),
    "off_by_one": ({"k = int(round(sparsity * n))": "k = int(sparsity * n) + 1"}, {"check_magnitude_mask"}),
    "descending": ({"sqrt(), stable=True)": "sqrt(), stable=True, descending=True)"}, {"check_channels"}),
}


def nbgrader(course: Path, *args: str, env: dict | None = None) -> None:
    env = dict(os.environ if env is None else env)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # nbgrader runs `alembic` from there
    done = subprocess.run(NBGRADER + list(args), cwd=course, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def submit(course: Path, student: str, nb: dict) -> None:
    folder = course / "submitted" / student / NAME
    folder.mkdir(parents=True)
    (folder / f"{NAME}.ipynb").write_text(json.dumps(nb))


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """The course copied, the student version generated, and four submissions autograded."""
    pytest.importorskip("nbgrader")
    course = tmp_path_factory.mktemp("course")
    shutil.copytree(COURSE, course, dirs_exist_ok=True, ignore=shutil.ignore_patterns("release", "submitted", "autograded",
                                                                                        "gradebook.db"))
    env = {**os.environ, "PRUNE_LAB_CACHE": str(tmp_path_factory.mktemp("cache"))}
    nbgrader(course, "generate_assignment", NAME, "--force", env=env)
    source = json.loads((course / "source" / NAME / f"{NAME}.ipynb").read_text())
    release = json.loads((course / "release" / NAME / f"{NAME}.ipynb").read_text())
    submit(course, "teacher", source)
    submit(course, "blank", release)
    for student, (edits, _) in WRONG.items():
        text = json.dumps(source)
        for old, new in edits.items():
            assert old in text, old
            text = text.replace(old, new)
        submit(course, student, json.loads(text))
    nbgrader(course, "autograde", NAME, "--create", "--force", env=env)
    return course


def grades(course: Path, student: str) -> dict[str, float]:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        sub = gb.find_submission(NAME, student)
        return {g.name: g.score for nb in sub.notebooks for g in nb.grades}


def errors(course: Path, student: str) -> list[str]:
    nb = json.loads((course / "autograded" / student / NAME / f"{NAME}.ipynb").read_text())
    return [o["evalue"] for c in nb["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]


POINTS = {"check_magnitude_mask": 4.0, "check_sensitivity_loop": 3.0, "check_channels": 3.0}


def test_the_student_version_holds_no_solution(course):
    release = (course / "release" / NAME / f"{NAME}.ipynb").read_text()
    assert "BEGIN SOLUTION" not in release and "END SOLUTION" not in release
    for line in SOLUTION_LINES:
        assert line in (course / "source" / NAME / f"{NAME}.ipynb").read_text()
        assert line not in release, line
    assert release.count("raise NotImplementedError()") == 4


def test_the_source_earns_every_point(course):
    assert grades(course, "teacher") == POINTS
    assert errors(course, "teacher") == []


def test_the_blank_version_earns_nothing_and_says_what_to_write(course):
    assert grades(course, "blank") == {k: 0.0 for k in POINTS}
    feedback = errors(course, "blank")
    for name in ("magnitude_mask", "sensitivity_loop", "rank_channels"):
        assert f"{name} is not written yet" in " ".join(feedback)


@pytest.mark.parametrize("student", list(WRONG))
def test_a_wrong_part_loses_exactly_its_points(course, student):
    failing = WRONG[student][1]
    assert grades(course, student) == {k: (0.0 if k in failing else v) for k, v in POINTS.items()}
    said = " ".join(errors(course, student))
    expected = {"largest": "the smallest magnitudes go first", "off_by_one": "must go",
                "ties_last": "equal magnitudes are pruned in another order",
                "descending": "rank_channels: got"}[student]
    assert expected in said


def test_the_source_earns_every_point_on_another_cpu(course, tmp_path):
    """ATen's portable kernels, one thread, a fresh cache: the demo model is trained anew there."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "PRUNE_LAB_CACHE": str(tmp_path)}
    nbgrader(course, "autograde", NAME, "--student", "teacher", "--force", env=env)
    assert grades(course, "teacher") == POINTS
