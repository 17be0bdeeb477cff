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


def test_version_prints_the_package_version(capsys):
    from pgolf import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"pgolf {__version__}"


def readme_exit_table() -> dict[int, str]:
    """The rows of README.md's exit-status table, as {code: meaning}."""
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("| exit status | meaning |") + 2  # past the header and its |---| line
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        code, meaning = (cell.strip() for cell in line.strip("|").split("|"))
        rows[int(code)] = meaning
    return rows


def test_exit_status_table_is_one_table_in_help_and_readme(capsys):
    from pgolf.rules import EXIT_CODES, STATUS_EXIT_CODES

    assert readme_exit_table() == EXIT_CODES
    assert set(STATUS_EXIT_CODES.values()) <= set(EXIT_CODES)
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    help_text = capsys.readouterr().out
    for code, meaning in EXIT_CODES.items():
        assert f"  {code:<4} {meaning}" in help_text


# Files whose handlers may still return literal exit statuses (none left).
LITERAL_EXIT_PENDING: set[str] = set()


def _returned_literals(value) -> list[int]:
    """Int literals a return statement can hand back directly (through `a if c else b`, `a or b`)."""
    import ast

    if isinstance(value, ast.Constant) and type(value.value) is int:
        return [value.value]
    if isinstance(value, ast.IfExp):
        return _returned_literals(value.body) + _returned_literals(value.orelse)
    if isinstance(value, ast.BoolOp):
        return [n for v in value.values for n in _returned_literals(v)]
    return []


def test_commands_return_named_exit_statuses():
    """Every command handler returns pgolf.rules' EXIT_* names, never bare numbers."""
    import ast

    package = Path(__file__).resolve().parents[1] / "pgolf"
    offenders = []
    for path in [package / "cli.py", *sorted((package / "lab").glob("*.py"))]:
        if path.name in LITERAL_EXIT_PENDING:
            continue
        for func in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(func, ast.FunctionDef) and (func.name.startswith(("cmd_", "_launch")) or func.name == "main"):
                offenders += [f"{path.name}:{node.lineno} {func.name}" for node in ast.walk(func)
                              if isinstance(node, ast.Return) and node.value is not None
                              and _returned_literals(node.value)]
                offenders += [f"{path.name}:{node.lineno} {func.name}" for node in ast.walk(func)
                              if isinstance(node, ast.Call) and ast.unparse(node.func) == "sys.exit"
                              and node.args and _returned_literals(node.args[0])]
    assert not offenders, offenders


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared FineWeb sample not present")
def test_data_dir_with_a_tokenizer_elsewhere_takes_its_vocabulary(tmp_path):
    """The layout `pgolf data fineweb` writes: shards in datasets/, the tokenizer in tokenizers/."""
    from pgolf.config.resolve import data_dir_overrides

    shards = tmp_path / "datasets"
    shards.mkdir()
    overrides = [f"data.tokenizer_path={SHARED / 'fineweb_1024_bpe.model'}"]
    assert "model.vocab_size=1024" in data_dir_overrides(shards, overrides)
    assert not any(o.startswith("model.vocab_size") for o in data_dir_overrides(shards, overrides + ["model.vocab_size=7"]))
