"""The `pgolf` command line: data tokenize, config, wall-clock cap."""

import json
from pathlib import Path

import pytest

from pgolf.cli import main as cli_main
from pgolf.data.shards import read_shard
from tests.train.test_train import tiny_config
from pgolf.train.run import run_training

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


def test_resume_takes_no_overrides(capsys):
    assert cli_main(["train", "--resume", "whatever", "train.iterations=5"]) == 2
    assert "saved config exactly" in capsys.readouterr().err


def test_official_env_command_uses_baseline_defaults_and_shards(monkeypatch, capsys):
    monkeypatch.setenv("DATA_PATH", "/data/fineweb10B_sp1024")
    monkeypatch.setenv("NUM_LAYERS", "11")
    assert cli_main(["config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    cfg = printed["config"]
    assert printed["preset"] == "baseline"
    assert cfg["data"]["source"] == "shards" and cfg["data"]["train_pattern"] == "fineweb_train_*.bin"
    assert cfg["model"]["num_layers"] == 11 and cfg["model"]["vocab_size"] == 1024
    # DATA_PATH also turns a synthetic preset into a shard run, as train_gpt.py would read it.
    assert cli_main(["config", "--config", "smoke"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["data"]["source"] == "shards"


def test_bad_settings_fail_before_training(capsys):
    for override, message in (("export.compressor=zst", "export.compressor must be one of"),
                              ("model.num_heads=0", "model.num_heads must be positive"),
                              ("train.val_batch_size=512", "train.val_batch_size=512 must give"),
                              ("data.tokenizer_path=x.model", "data.source=synthetic is a byte-level corpus")):
        assert cli_main(["train", override]) == 2, override
        assert message in capsys.readouterr().err


def test_nproc_must_divide_eight(capsys):
    assert cli_main(["train", "--nproc", "3"]) == 2
    assert "use 1, 2, 4 or 8 processes" in capsys.readouterr().err
