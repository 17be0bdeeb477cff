"""`pgolf run --seeds` groups and `pgolf compare`."""

import json
import math

import pytest

from pgolf.cli import main as cli_main
from pgolf.config import ConfigError
from pgolf.lab.experiments import compare_rows, parse_seeds, resolve_runs
from pgolf.lab.ledger import Ledger
from pgolf.runs import group_run_dirs
from pgolf.lab.stats import verdict
from pgolf.train.run import Trainer
from tests.train.test_train import TINY_MODEL, TINY_TRAIN, synthetic_overrides

FAST = ["model.num_layers=2", "train.val_loss_every=0", "train.warmup_steps=0"]


def run_args(tmp_path, group, seeds, *extra):
    return ["run", "smoke", "--seeds", seeds, "--group", group, *synthetic_overrides(tmp_path), *TINY_MODEL,
            *TINY_TRAIN, *FAST, *extra]


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory, one_cpu_thread):
    """Group short (3 steps) and group long (12 steps), two seeds each."""
    tmp = tmp_path_factory.mktemp("groups")
    assert cli_main(run_args(tmp, "short", "1,2", "train.iterations=3")) == 0
    assert cli_main(run_args(tmp, "long", "1,2", "train.iterations=12")) == 0
    return tmp


def test_run_trains_each_seed_as_one_group(two_groups, capsys):
    runs_dir = two_groups / "runs"
    dirs = group_run_dirs("short", runs_dir)
    assert len(dirs) == 2
    seeds = sorted(json.loads((d / "config.json").read_text())["config"]["train"]["seed"] for d in dirs)
    assert seeds == [1, 2]
    rows = Ledger(runs_dir).rows("short")
    assert [r["status"] for r in rows] == ["done", "done"] and {r["seed"] for r in rows} == {1, 2}
    assert rows[0]["config_hash"] == rows[1]["config_hash"]  # seeds of one config share a hash
    assert rows[0]["config_hash"] != Ledger(runs_dir).rows("long")[0]["config_hash"]


def test_run_prints_the_table_and_mean(tmp_path, one_cpu_thread, capsys):
    # Options may also follow the overrides.
    args = ["run", "smoke", *synthetic_overrides(tmp_path), *TINY_MODEL, "--seeds", "7,8", *TINY_TRAIN, *FAST,
            "train.iterations=2", "--group", "g"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    rows = Ledger(tmp_path / "runs").rows("g")
    mean = sum(r["val_bpb"] for r in rows) / 2
    std = abs(rows[0]["val_bpb"] - rows[1]["val_bpb"]) / math.sqrt(2)
    assert "group g: 2 of 2 seeds run" in out and f"val_bpb {mean:.4f} ± {std:.4f}" in out
    for r in rows:
        assert r["run_id"] in out


def test_a_failed_seed_is_recorded_and_the_group_goes_on(tmp_path, one_cpu_thread, monkeypatch, capsys):
    real_step = Trainer.train_step

    def step(self, scale):
        loss = real_step(self, scale)
        return loss * float("nan") if self.cfg.train.seed == 2 else loss

    real_init = Trainer.__init__

    def init(self, cfg, *args):
        if cfg.train.seed == 3:
            raise RuntimeError("disk on fire")
        real_init(self, cfg, *args)

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(Trainer, "__init__", init)
    assert cli_main(run_args(tmp_path, "g", "1,2,3,4", "train.iterations=2")) == 1
    statuses = {r["seed"]: r["status"] for r in Ledger(tmp_path / "runs").rows("g")}
    assert statuses == {1: "done", 2: "failed", 3: "failed", 4: "done"}
    out = capsys.readouterr()
    assert "disk on fire" in out.err and "mean ± std over 2 runs" in out.out


def test_bad_seeds_and_config_fail_before_any_run(tmp_path, capsys):
    with pytest.raises(ConfigError, match="integers"):
        parse_seeds("1,x")
    with pytest.raises(ConfigError, match="each seed once"):
        parse_seeds("1,1")
    assert cli_main(run_args(tmp_path, "g", "1,2", "model.num_layer=3")) == 2
    assert "did you mean" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_compare_groups(two_groups, capsys):
    runs_dir = str(two_groups / "runs")
    assert cli_main(["compare", "short", "long", "--runs-dir", runs_dir, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    short, long = Ledger(runs_dir).rows("short"), Ledger(runs_dir).rows("long")
    expected = verdict([r["val_loss"] for r in short], [r["val_loss"] for r in long])
    (score,) = [m for m in result["metrics"] if m["metric"] == "val_bpb"]
    assert score["n_a"] == 2 and score["n_b"] == 2
    assert score["p"] == pytest.approx(expected.welch.p) and score["better"] == expected.better
    assert score["delta_nats"] == pytest.approx(-expected.improvement)
    mean_bpb = [sum(r["val_bpb"] for r in rows) / 2 for rows in (short, long)]
    assert score["delta_bpb"] == pytest.approx(mean_bpb[1] - mean_bpb[0])
    assert score["delta_nats"] < 0  # twelve steps learn more than three
    assert [m["metric"] for m in result["metrics"]] == ["val_bpb", "pre_quant"]  # no sliding/TTT evals yet
    assert result["size"]["n_a"] == 2 and result["margin_nats"] == 0.005 and result["alpha"] == 0.01

    assert cli_main(["compare", "short", "long", "--runs-dir", runs_dir]) == 0
    text = capsys.readouterr().out
    assert "A = short" in text and "Δnats B−A" in text and "verdict (val_bpb):" in text
    assert "one-sided Welch t-test" in text
    # Both rules, each with its verdict: the README's, then the end-of-challenge progression rule.
    lines = text.rstrip().splitlines()
    assert lines[-4].startswith("rule: B must beat A by more than 0.005 nats (val_loss) at p < 0.01")
    assert lines[-3].startswith("verdict (val_bpb): ")
    assert lines[-2].startswith("progression rule: B must beat A at p < 0.25, one-sided Welch t-test, no margin")
    progression = verdict([r["val_loss"] for r in short], [r["val_loss"] for r in long], 0.0, 0.25)
    assert lines[-1] == (f"progression verdict (val_bpb): {'YES' if progression.better else 'NO'}, "
                         f"{progression.reason}")
    assert score["progression"]["p"] == pytest.approx(progression.welch.p)
    assert result["progression_alpha"] == 0.25 and result["progression_margin_nats"] == 0.0


def test_compare_takes_run_ids_directories_and_lists(two_groups, capsys):
    runs_dir = two_groups / "runs"
    short = group_run_dirs("short", runs_dir)
    long = group_run_dirs("long", runs_dir)
    assert resolve_runs(f"{short[0].name},{short[1]}", runs_dir) == [short[0], short[1]]
    assert cli_main(["compare", short[0].name, str(long[0]), "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert "verdict (val_bpb): NO, cannot claim significance: needs at least 2 runs per group (have 1 and 1)" in out
    assert cli_main(["compare", "nope", "long", "--runs-dir", str(runs_dir)]) == 2
    err = capsys.readouterr().err
    assert "'nope' is neither a run directory, a run id nor a group" in err and "short" in err


def _row(run_id, loss, bpb, status="done", **extra):
    pre = (loss - 0.01, bpb - 0.01) if loss is not None else (None, None)
    return {"run_id": run_id, "status": status, "val_loss": loss, "val_bpb": bpb, "pre_val_loss": pre[0],
            "pre_val_bpb": pre[1], "total_bytes": 1000, "tokenizer": "tok.model", **extra}


def test_compare_rows_metrics_present_left_out_runs_and_tokenizers():
    a = [_row("a1", 2.00, 1.20, sliding_val_loss=1.98, sliding_val_bpb=1.19), _row("a2", 2.01, 1.21),
         _row("a3", None, None, status="failed")]
    b = [_row("b1", 1.90, 1.10, sliding_val_loss=1.88, sliding_val_bpb=1.09), _row("b2", 1.91, 1.11,
                                                                                    tokenizer="other.model")]
    result = compare_rows(a, b)
    names = [m["metric"] for m in result["metrics"]]
    assert names == ["val_bpb", "pre_quant", "sliding"]
    sliding = result["metrics"][2]
    assert sliding["n_a"] == 1 and sliding["n_b"] == 1 and math.isnan(sliding["p"]) and not sliding["better"]
    score = result["metrics"][0]
    assert score["n_a"] == 2 and score["delta_nats"] == pytest.approx(-0.10)
    assert score["delta_bpb"] == pytest.approx(-0.10) and score["better"]
    assert score["progression"]["better"] and score["progression"]["p"] < score["p"]  # no margin: a smaller p
    assert any("left out 1 runs" in n and "a3 failed" in n for n in result["notes"])
    assert any("different tokenizers" in n for n in result["notes"])
    assert result["runs_a"] == ["a1", "a2"]
