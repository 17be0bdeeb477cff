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
# The artifact's metadata holds the run id (made from the clock), so its compressed length moves
# by a few bytes from run to run; these lines match up to that. The per-component lines under
# "artifact model bytes" split the file's bytes in proportion (largest remainder), so any of them
# can move by a byte with it.
META_DEPENDENT = re.compile(r"^(artifact model bytes: |  [a-z0-9+ ]+: |total: )([\d,]+)")
META_SLACK_BYTES = 16


def same_line(want: str, got: str) -> bool:
    want, got = TIMING.sub(r"\1_ s  \2_ ms", want), TIMING.sub(r"\1_ s  \2_ ms", got)
    w, g = META_DEPENDENT.match(want), META_DEPENDENT.match(got)
    if w and g and w[1] == g[1]:
        close = abs(int(w[2].replace(",", "")) - int(g[2].replace(",", ""))) <= META_SLACK_BYTES
        return close and want[w.end():] == got[g.end():]
    return want == got


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
        assert same_line(want, got), (want, got)


def test_lines_match_up_to_timing_and_the_run_ids_bytes():
    assert same_line("train_time: 1.0 s  step_avg: 2.00 ms", "train_time: 9.5 s  step_avg: 7.10 ms")
    assert same_line("artifact model bytes: 841,448", "artifact model bytes: 841,449")
    assert same_line("total: 897,062 / 16,000,000 (fits)", "total: 897,063 / 16,000,000 (fits)")
    assert not same_line("code bytes: 55,614 (x)", "code bytes: 55,615 (x)")
    assert not same_line("artifact model bytes: 841,448", "artifact model bytes: 851,448")
    assert same_line("  fp16 passthrough: 832,498", "  fp16 passthrough: 832,499")
    assert not same_line("  fp16 passthrough: 832,498", "  fp32 passthrough: 832,498")
