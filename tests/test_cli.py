"""The `pgolf` command line: data tokenize, config, wall-clock cap."""

import json
from pathlib import Path

import pytest

from pgolf.cli import main as cli_main
from pgolf.data import read_shard
from tests.test_train import tiny_config
from pgolf.train import run_training

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fineweb_sp1024_sample"


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared FineWeb sample not present")
def test_data_tokenize_reproduces_the_official_val_shard(tmp_path, capsys):
    out = tmp_path / "shards"
    code = cli_main(["data", "tokenize", str(SHARED / "docs_val.jsonl"), "--tokenizer",
                     str(SHARED / "fineweb_1024_bpe.model"), "--out", str(out), "--val-docs", "300"])
    assert code == 0
    assert (out / "fineweb_val_000000.bin").read_bytes() == (SHARED / "fineweb_val_000000.bin").read_bytes()
    # Running it again refuses to replace the shards it wrote.
    assert cli_main(["data", "tokenize", str(SHARED / "docs_val.jsonl"), "--tokenizer",
                     str(SHARED / "fineweb_1024_bpe.model"), "--out", str(out), "--val-docs", "300"]) == 1
    assert "overwrite" in capsys.readouterr().err
    assert read_shard(out / "fineweb_val_000000.bin").size == 392_385


def test_config_command_prints_the_resolved_config(capsys):
    assert cli_main(["config", "--config", "baseline", "model.num_layers=11"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["model"]["num_layers"] == 11 and printed["config"]["model"]["model_dim"] == 512


def test_wallclock_cap_stops_training(tmp_path):
    cfg = tiny_config(tmp_path, "train.iterations=100000", "train.max_wallclock_seconds=0.5",
                      "train.val_loss_every=0", "train.warmdown_frac=0.5")
    summary = run_training(cfg, console=False)
    assert summary["status"] == "done" and summary["stop_reason"] == "wallclock_cap"
    assert 0 < summary["steps"] < 100000 and summary["train_time_ms"] >= 500
