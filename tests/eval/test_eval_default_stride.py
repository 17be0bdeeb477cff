"""`pgolf eval RUN` (with or without --ttt) scores with the run's configured window stride
(train.eval_stride; 0: train_seq_len) unless --stride says otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgolf.cli import main as cli_main
from pgolf.train.run import run_training
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
TTT = ["--ttt", "--ttt-chunk", "1024", "--ttt-epochs", "1", "--ttt-lr", "0.01", "--ttt-batch", "4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("stride")
    summary = run_training(tiny_config(tmp, "train.iterations=4", "train.val_loss_every=0", "train.eval_stride=16",
                                       "run.run_id=s16"), console=False)
    assert summary["status"] == "done" and summary["roundtrip_stride"] == 16
    return tmp / "runs" / "s16"


def eval_receipt(run_dir: Path, capsys, *args: str) -> tuple[dict, dict]:
    capsys.readouterr()
    assert cli_main(["eval", str(run_dir), "--json", "--device", "cpu", *args]) == 0
    result = json.loads(capsys.readouterr().out)
    return result, json.loads(Path(result["receipt"]).read_text())


def test_ttt_defaults_to_the_configured_stride(run_dir, capsys):
    result, receipt = eval_receipt(run_dir, capsys, *TTT)
    assert result["kind"] == "ttt" and receipt["settings"]["stride"] == 16
    _, given = eval_receipt(run_dir, capsys, *TTT, "--stride", "64")
    assert given["settings"]["stride"] == 64


def test_plain_eval_defaults_to_the_configured_stride_and_reproduces_the_roundtrip(run_dir, capsys):
    summary = json.loads((run_dir / "summary.json").read_text())
    result, receipt = eval_receipt(run_dir, capsys, "--batch", "8")  # the training run's windows per batch
    assert result["kind"] == "sliding" and receipt["settings"] == {"seq_len": 64, "stride": 16}
    assert result["val_bpb"] == pytest.approx(summary["roundtrip"]["val_bpb"], rel=1e-12)
    standard, receipt = eval_receipt(run_dir, capsys, "--stride", "64")
    assert standard["kind"] == "standard" and receipt["settings"]["stride"] == 64
