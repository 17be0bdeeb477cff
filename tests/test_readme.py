"""The README's first screen is true: its sample output is what the default `pgolf train` prints
(up to timing), and its two commands are the ones CI runs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TIMING = re.compile(r"(train_time: )[\d.]+ s  (step_avg: )[\d.]+ ms")


def sample_output() -> list[str]:
    block = re.search(r"It ends with what a participant reads.*?```\n(.*?)```", README, re.S)[1]
    return block.rstrip("\n").splitlines()


def test_the_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in README.split("```")[1] and "python -m pytest" in ci
    assert "torch==2.13.0" in ci and 'pip install --quiet -e ".[test]"' in ci


@pytest.mark.slow
def test_the_sample_output_is_what_the_default_run_prints(tmp_path):
    """Runs the README's main job (about 3 minutes on a 2-core CPU). The README's sample was
    made with brotli installed: the code-bytes line depends on it."""
    pytest.importorskip("brotli")
    run = subprocess.run([sys.executable, "-m", "pgolf", "train"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]
    printed = run.stdout.splitlines()
    shown = sample_output()
    start = printed.index(shown[0])
    for want, got in zip(shown, printed[start:start + len(shown)], strict=True):
        assert TIMING.sub(r"\1_ s  \2_ ms", got) == TIMING.sub(r"\1_ s  \2_ ms", want)
