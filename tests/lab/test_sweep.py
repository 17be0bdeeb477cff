"""`pgolf sweep`: the keep rule, over-cap discards, budgets, and resuming after an interruption."""

import json
from pathlib import Path

import pytest

import pgolf.train.export
from pgolf.compress.accounting import size_report
from pgolf.cli import main as cli_main
from pgolf.config import ConfigError
from pgolf.lab.ledger import Ledger
from pgolf.runs import group_run_dirs
from pgolf.lab.sweep import Sweep, load_spec, parse_spec
from pgolf.train.run import Trainer, run_training
from tests.train.test_train import TINY_MODEL, TINY_TRAIN, synthetic_overrides

FAST = ["model.num_layers=2", "train.val_loss_every=0", "train.warmup_steps=0", "train.iterations=3"]


def write_spec(directory: Path, body: str, seeds=(1, 2), extra_base=()) -> Path:
    base = synthetic_overrides(directory) + TINY_MODEL + TINY_TRAIN + FAST + list(extra_base)
    lines = ['name = "t"', 'preset = "smoke"', f"seeds = {list(seeds)}", "", "[base]"]
    lines += [f'"{k}" = "{v}"' for k, v in dict(item.split("=", 1) for item in base).items()]  # later wins
    path = directory / "sweep.toml"
    path.write_text("\n".join(lines) + "\n\n" + body, encoding="utf-8")
    return path


# A loose rule (win by more than -1 nats at p < 0.5) makes every finished variant a keeper,
# so the test sees the default move along the queue.
CHAIN = """
[keep]
margin_nats = -1.0
p = 0.5

[[variants]]
name = "longer"
overrides = { "train.iterations" = 5 }

[grid]
"optim.matrix_lr" = [0.02]
"""


def results(directory: Path) -> tuple[str, dict]:
    sweep_dir = directory / "runs" / "sweeps" / "t"
    return (sweep_dir / "results.md").read_text(), json.loads((sweep_dir / "results.json").read_text())


def without_bytes(markdown: str) -> str:
    return "\n".join(line.rsplit("|", 2)[0] if line.startswith("| ") else line for line in markdown.splitlines())


def test_interrupted_sweep_resumes_to_the_same_table(tmp_path, one_cpu_thread, monkeypatch, capsys):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir(), broken.mkdir()
    assert cli_main(["sweep", str(write_spec(straight, CHAIN))]) == 0
    md_straight, js_straight = results(straight)

    spec_path = write_spec(broken, CHAIN)
    real_train = Sweep._train
    calls = []

    def killed_on_third_run(self, cfg, applied):
        calls.append(cfg.run.run_id)
        if len(calls) == 3:  # stop midway through the third run, as a Ctrl-C would
            run_training(cfg, interrupt_at_step=1, console=False)
            raise KeyboardInterrupt
        return real_train(self, cfg, applied)

    monkeypatch.setattr(Sweep, "_train", killed_on_third_run)
    assert cli_main(["sweep", str(spec_path), "--quiet"]) == 130
    assert "rerun `pgolf sweep" in capsys.readouterr().err
    state = json.loads((broken / "runs/sweeps/t/state.json").read_text())
    assert [r["status"] for r in state["experiments"][1]["runs"]] == ["running"]
    monkeypatch.setattr(Sweep, "_train", real_train)
    assert cli_main(["sweep", str(spec_path)]) == 0
    md_broken, js_broken = results(broken)

    # The same table; only the byte counts may differ by a few bytes, as each artifact's metadata
    # names its own run (the restarted run is t-01-longer-s1-r2).
    assert without_bytes(md_broken) == without_bytes(md_straight)
    for a, b in zip(js_broken["experiments"], js_straight["experiments"]):
        assert abs(a["total_bytes"] - b["total_bytes"]) < 64
        assert {**a, "total_bytes": 0, "runs": 0} == {**b, "total_bytes": 0, "runs": 0}
    assert [r["decision"] for r in js_broken["experiments"]] == ["baseline", "keep", "keep"]
    # Later variants build on the kept ones; the interrupted run was restarted fresh, the rest not rerun.
    assert js_broken["final_default"]["overrides"]["train.iterations"] == "5"
    assert js_broken["final_default"]["overrides"]["optim.matrix_lr"] == "0.02"
    assert js_broken["experiments"][2]["vs"] == "longer"
    assert js_broken["experiments"][1]["runs"] == ["t-01-longer-s1-r2", "t-01-longer-s2"]
    assert len(calls) == 3
    ledger = {r["run_id"]: r["status"] for r in Ledger(broken / "runs").rows()}
    assert ledger["t-01-longer-s1"] == "interrupted" and ledger["t-01-longer-s1-r2"] == "done"
    assert len(ledger) == 7
    # The group holds the claim's runs only; the stopped attempt moved out of it.
    assert [d.name for d in group_run_dirs("t-01-longer", broken / "runs")] == ["t-01-longer-s1-r2",
                                                                                "t-01-longer-s2"]
    assert [r["run_id"] for r in Ledger(broken / "runs").rows("t-01-longer.abandoned")] == ["t-01-longer-s1"]
    assert (broken / "runs/sweeps/t/results.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "| 1 | longer | `train.iterations=5` | baseline | 2 |" in out


def test_over_cap_is_discarded_and_the_budget_stops_and_resumes(tmp_path, one_cpu_thread, monkeypatch):
    # Artifacts over 60 kB of model bytes break this test's cap: the 64-wide model does, the 32-wide does not.
    monkeypatch.setattr(pgolf.train.export, "size_report",
                        lambda model_bytes, code_bytes, *a, **k: size_report(model_bytes, code_bytes, *a, **k,
                                                                             cap=code_bytes + 60_000))
    real_init = Trainer.__init__

    def init(self, cfg, *args):
        if cfg.model.num_layers == 1:
            raise RuntimeError("out of memory (pretend)")
        real_init(self, cfg, *args)

    monkeypatch.setattr(Trainer, "__init__", init)
    body = """
[budget]
max_experiments = 3

[[variants]]
name = "wide"
overrides = { model = { model_dim = 64 } }

[[variants]]
name = "broken"
overrides = { "model.num_layers" = 1 }

[[variants]]
name = "two_steps"
overrides = { "train.iterations" = 2 }
"""
    spec_path = write_spec(tmp_path, body, seeds=(1,))
    assert cli_main(["sweep", str(spec_path)]) == 0
    md, js = results(tmp_path)
    assert [r["decision"] for r in js["experiments"]] == ["baseline", "over_cap", "failed", "not run"]
    assert "bytes, over the cap" in js["experiments"][1]["reason"]
    assert Ledger(tmp_path / "runs").rows("t-01-wide")[0]["status"] == "over_cap"
    assert js["experiments"][2]["reason"] == "seed 1: failed"
    assert "out of memory (pretend)" in Ledger(tmp_path / "runs").rows("t-02-broken")[0]["error"]
    assert "max_experiments = 3" in js["stopped"] and "Stopped by the budget" in md
    assert js["final_default"]["name"] == "baseline"

    spec_path.write_text(spec_path.read_text().replace("max_experiments = 3", "max_experiments = 4"))
    assert cli_main(["sweep", str(spec_path)]) == 0
    md, js = results(tmp_path)
    assert [r["decision"] for r in js["experiments"]] == ["baseline", "over_cap", "failed", "discard"]
    assert "at least 2 runs per group" in js["experiments"][3]["reason"]  # one seed cannot claim anything
    assert js["experiments"][3]["vs"] == "baseline" and js["stopped"] == ""


def test_a_changed_spec_is_refused(tmp_path, one_cpu_thread, capsys):
    spec_path = write_spec(tmp_path, CHAIN.replace('[grid]\n"optim.matrix_lr" = [0.02]', ""), seeds=(1,),
                           extra_base=["train.iterations=1"])
    assert cli_main(["sweep", str(spec_path), "--quiet"]) == 0
    spec_path.write_text(spec_path.read_text().replace("seeds = [1]", "seeds = [1, 2]"))
    assert cli_main(["sweep", str(spec_path)]) == 2
    assert "different spec" in capsys.readouterr().err


def test_spec_parsing():
    spec = parse_spec({"seeds": [1, 2], "base": {"model": {"num_layers": 2}, "export.policy": [["tok_emb", "fp16"]]},
                       "grid": {"model.mlp_mult": [2, 3], "optim.matrix_lr": [0.02, 0.04]},
                       "variants": [{"name": "tied", "overrides": {"model.tie_embeddings": False}}]}, "s")
    assert spec.name == "s" and spec.base == {"model.num_layers": "2", "export.policy": "tok_emb:fp16"}
    assert [v.name for v in spec.variants] == ["tied", "mlp_mult=2,matrix_lr=0.02", "mlp_mult=2,matrix_lr=0.04",
                                               "mlp_mult=3,matrix_lr=0.02", "mlp_mult=3,matrix_lr=0.04"]
    assert spec.variants[0].overrides == {"model.tie_embeddings": "false"}
    assert spec.margin == 0.005 and spec.alpha == 0.01 and spec.max_experiments == 0
    lists = parse_spec({"seeds": [1], "variants": [{"name": "v", "overrides": {
        "model.embed": ["bigram"], "model.xsa_layers": [-2, -1], "model.post_norm": []}}]}, "s")
    assert lists.variants[0].overrides == {"model.embed": "bigram", "model.xsa_layers": "-2,-1", "model.post_norm": ""}
    for bad, message in (({"seeds": [1], "variant": []}, "unknown keys variant"),
                         ({"seeds": [], "grid": {"a.b": [1]}}, "distinct integers"),
                         ({"seeds": [1]}, "no variants"),
                         ({"seeds": [1], "variants": [{"name": "baseline"}]}, "must be unique"),
                         ({"seeds": [1], "variants": [{"name": "x", "overides": {}}]}, "needs name"),
                         ({"seeds": [1], "grid": {"a.b": []}}, "non-empty list"),
                         ({"seeds": [1], "grid": {"a.b": [1]}, "keep": {"alpha": 1}}, "takes margin_nats and p")):
        with pytest.raises(ConfigError, match=message):
            parse_spec(bad, "s")


def test_a_typo_in_a_variant_fails_before_any_run(tmp_path):
    spec_path = write_spec(tmp_path, '[[variants]]\nname = "x"\noverrides = { "model.num_layer" = 3 }\n')
    with pytest.raises(ConfigError, match="did you mean 'num_layers'"):
        Sweep(load_spec(spec_path))
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="not valid TOML"):
        (tmp_path / "bad.toml").write_text("seeds = [")
        load_spec(tmp_path / "bad.toml")


def test_a_run_that_ended_just_before_the_stop_is_kept(tmp_path, one_cpu_thread, monkeypatch):
    spec_path = write_spec(tmp_path, '[[variants]]\nname = "v"\noverrides = { "train.iterations" = 2 }\n', seeds=(1,))
    real_train = Sweep._train

    def finish_then_stop(self, cfg, applied):  # killed after the run, before the sweep saved its outcome
        real_train(self, cfg, applied)
        raise KeyboardInterrupt

    monkeypatch.setattr(Sweep, "_train", finish_then_stop)
    assert cli_main(["sweep", str(spec_path), "--quiet"]) == 130
    calls = []

    def counted(self, cfg, applied):
        calls.append(cfg.run.run_id)
        return real_train(self, cfg, applied)

    monkeypatch.setattr(Sweep, "_train", counted)
    assert cli_main(["sweep", str(spec_path), "--quiet"]) == 0
    assert calls == ["t-01-v-s1"]
    _, js = results(tmp_path)
    assert js["experiments"][0]["runs"] == ["t-00-baseline-s1"] and js["experiments"][0]["n"] == 1


def test_every_repository_sweep_spec_resolves_for_each_variant(tmp_path):
    from pgolf.config.resolve import REPO_CONFIG_DIR

    for path in sorted((REPO_CONFIG_DIR / "sweeps").glob("*.toml")):
        # checks every variant's config, as a sweep does before its first run (state kept apart)
        Sweep(load_spec(path, [f"run.runs_dir={tmp_path / path.stem}"]))
