"""bench/gpu_check.sh, the one command of a lent GPU machine, checked where there is no GPU: its stage
limits fit the lent machine's budget, every planned stage runs, and what it leaves in OUT fits what such a
run brings back (at most 8 files, no deeper than two folders)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
# A lent machine's command runs for at most 10 minutes, its session has 15 in all (start-up included);
# the check must leave room for a second run.
BUDGET_LIMIT_S = 450
MAX_RETURNED_FILES = 8


def _plan() -> tuple[list[tuple[str, int, int]], int, int]:
    out = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    stages = [(name, int(limit), int(minimum)) for name, limit, minimum in (ln.split() for ln in lines[:-1])]
    _, total, _, budget = lines[-1].split()
    return stages, int(total), int(budget)


def _env() -> dict:
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    return env


def _returned_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file()]


def test_plan_fits_the_budget():
    stages, total, budget = _plan()
    assert budget <= BUDGET_LIMIT_S
    assert total == sum(limit for _, limit, _ in stages) == budget  # the script's header says they add up
    assert all(0 < minimum <= limit for _, limit, minimum in stages)
    names = [name for name, _, _ in stages]
    assert len(set(names)) == len(names)
    # correctness before speed
    assert names.index("build") < names.index("tests_cuda") < names.index("bench_1m")
    # every planned stage is actually started by the script (directly or through a helper)
    text = SCRIPT.read_text()
    for name in names:
        assert f"stage {name} " in text or f"_stage {name} " in text, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_it_stops_at_once_and_says_so(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", str(SCRIPT), str(out)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    summary = (out / "summary.txt").read_text()
    assert "no CUDA device" in summary
    files = _returned_files(out)
    assert len(files) <= MAX_RETURNED_FILES
    assert {p.name for p in files} == {"summary.txt", "gpu_check.tar.gz"}


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the no-GPU mode")
@pytest.mark.heavy  # every stage in a dry run: several minutes on 2 cores
@pytest.mark.slow
def test_dry_run_runs_every_stage_it_can(tmp_path):
    """--dry collects each test stage (a selection that matches nothing fails), runs each benchmark stage at
    a tiny CPU size, and packs every log into the one archive."""
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", str(SCRIPT), "--dry", str(out)], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    summary = (out / "summary.txt").read_text()
    stages, _, _ = _plan()
    for name, _, _ in stages:
        line = next((ln for ln in summary.splitlines() if ln.startswith(f"{name}:")), None)
        assert line is not None, f"{name} missing from the summary:\n{summary}"
        assert "rc=0" in line or "skipped in a dry run" in line, f"{line}\n{summary}"
    files = _returned_files(out)
    assert len(files) <= MAX_RETURNED_FILES
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        names = archive.getnames()
    for stage in ("env", "tests_cuda", "tests_triton", "bench_1m", "bench_chunks", "profile", "bench_4m"):
        assert f"./{stage}.log" in names, names
    # the benchmark stages wrote their CSV into the archive, not into the checkout
    assert any(n.startswith("./bench_1m/") and n.endswith(".csv") for n in names), names
    assert "./profile/profile.csv" in names, names
    assert "[profile] matmul:" in summary, summary  # the split reaches the summary, not only the archive


def test_every_stated_budget_is_the_scripts():
    """Each figure the docs give for gpu_check's run time (on a line that names gpu_check or its budget) is the
    script's BUDGET_S, in seconds or minutes, and each stage's row in bench/README.md is its limit."""
    stages, _, budget = _plan()
    stated = []
    for doc in ("README.md", "bench/README.md", "CONTRIBUTING.md", "bench/gpu_check.sh"):
        for line in (ROOT / doc).read_text().splitlines():
            if "gpu_check" not in line and "limits add up" not in line:
                continue
            for number, unit in re.findall(r"(\d+(?:\.\d+)?) ?(minutes|min|s)\b", line):
                seconds = float(number) * (60 if unit.startswith("min") else 1)
                stated.append((doc, line.strip(), seconds))
    assert stated, "no stated budget found: the docs should give gpu_check's run time"
    wrong = [(doc, line) for doc, line, seconds in stated if seconds != budget]
    assert not wrong, f"budget {budget} s in bench/gpu_check.sh, but: {wrong}"
    table = (ROOT / "bench" / "README.md").read_text()
    for name, limit, _ in stages:
        assert re.search(rf"^\| {name} \| {limit} s \|", table, re.M), f"bench/README.md: stage {name} is {limit} s"
