"""`pgolf plan`: parameter counts, FLOPs, steps from throughput, artifact estimate vs a real run."""

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch

from pgolf.compress.container import pack_artifact
from pgolf.cli import main as cli_main
from pgolf.rules import EXIT_OVER_CAP
from pgolf.compress.policy import plan_export
from pgolf.config import set_key
from pgolf.config.resolve import resolve_config
from pgolf.lab.plan import (build_initial_model, count_flops, count_parameters_by_component, estimate_artifact,
                        measured_throughput, plan_config, step_budget)
from pgolf.lab.plan_weights import DEFAULT_LAWS, laws_from_run, standard_draw
from pgolf.runs import write_json
from pgolf.train.run import run_training

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fineweb_sp1024_sample"
SMALL = ["model.vocab_size=100", "model.num_layers=2", "model.model_dim=64", "model.num_heads=4",
         "model.num_kv_heads=2", "train.train_seq_len=32", "train.train_batch_tokens=2048",
         "train.val_batch_size=2048"]


def small_config(*extra: str):
    cfg, _ = resolve_config(None, SMALL + list(extra), env={})
    return cfg


def test_baseline_parameters_per_component():
    cfg, _ = resolve_config("baseline", [], env={})
    counts = count_parameters_by_component(build_initial_model(cfg))
    blocks = 9
    attention = 512 * 512 + 2 * (256 * 512) + 512 * 512  # c_q, c_k, c_v (4 KV heads of 64), proj
    mlp = 2 * (1024 * 512)  # fc and proj at 2 x 512
    control = 512 + 512 + 2 * 512 + 8  # attn_scale, mlp_scale, resid_mix, q_gain
    assert counts == {"embedding": 1024 * 512, "attention": blocks * attention, "mlp": blocks * mlp,
                      "control": blocks * control + 4 * 512, "other": 0, "total": 17_059_912}


def test_small_untied_and_swiglu_parameters_per_component():
    counts = count_parameters_by_component(build_initial_model(small_config("model.tie_embeddings=false")))
    assert counts == {"embedding": 2 * 100 * 64, "attention": 2 * (64 * 64 * 2 + 2 * 32 * 64),
                      "mlp": 2 * (2 * 128 * 64), "control": 2 * (64 + 64 + 128 + 4) + 64, "other": 0,
                      "total": 70_728}
    # A variant's new matrices land in their component without the planner knowing them.
    swiglu = count_parameters_by_component(build_initial_model(small_config("model.mlp=swiglu")))
    assert swiglu["mlp"] == 2 * 3 * (192 * 64)  # gate, up, proj at round_up(64 * 8 / 3, 64) = 192


def _matmul_params(cfg) -> int:
    """Weights multiplied once per token per pass: every block linear, plus the output head."""
    m = cfg.model
    kv = m.num_kv_heads * m.model_dim // m.num_heads
    per_block = 2 * m.model_dim * m.model_dim + 2 * kv * m.model_dim + 2 * m.mlp_mult * m.model_dim * m.model_dim
    return m.num_layers * per_block + m.vocab_size * m.model_dim


def test_flops_match_the_hand_formula():
    cfg = small_config()
    seq, dim, layers = cfg.train.train_seq_len, cfg.model.model_dim, cfg.model.num_layers
    flops = count_flops(build_initial_model(cfg), seq)
    assert flops["forward_matmul"] == 2 * _matmul_params(cfg)
    # Q K^T and A V: 2 x seq x dim multiply-adds each, per token per layer (dense, GQA included).
    assert flops["forward_attention"] == 4 * seq * dim * layers
    assert flops["backward"] == 2 * flops["forward"]
    assert flops["total"] == 6 * _matmul_params(cfg) + 12 * seq * dim * layers


def test_recurrence_doubles_the_block_flops():
    cfg = small_config()
    flat = count_flops(build_initial_model(cfg), cfg.train.train_seq_len)
    looped = count_flops(build_initial_model(small_config("model.recurrence=2")), cfg.train.train_seq_len)
    head = 2 * cfg.model.vocab_size * cfg.model.model_dim  # runs once whatever the depth
    assert looped["forward_matmul"] - head == 2 * (flat["forward_matmul"] - head)
    assert looped["forward_attention"] == 2 * flat["forward_attention"]
    assert looped["total"] / flat["total"] == pytest.approx(2, rel=0.1)


def test_steps_from_a_given_throughput():
    cfg = small_config("train.max_wallclock_seconds=600", "train.iterations=20000")
    budget = step_budget(cfg, 2048 / 0.2, "given")  # 0.2 s per step
    assert (budget["steps_fit"], budget["steps"], budget["stopped_by"]) == (3000, 3000, "wallclock")
    assert budget["train_tokens"] == 3000 * 2048
    reserved = step_budget(small_config("train.max_wallclock_seconds=600", "export.gptq=true",
                                        "export.gptq_reserve_seconds=100"), 2048 / 0.2, "given")
    assert reserved["steps_fit"] == 2500
    short = step_budget(small_config("train.max_wallclock_seconds=600", "train.iterations=100"), 2048 / 0.2, "given")
    assert (short["steps"], short["stopped_by"]) == (100, "iterations")
    unknown = step_budget(cfg, None, None)
    assert unknown["steps_fit"] is None and unknown["steps"] == 20000


def _fake_run(runs: Path, run_id: str, cfg, status="done", steps=100, ms=50_000.0, mtime=None) -> Path:
    run = runs / run_id
    run.mkdir(parents=True)
    write_json(run / "config.json", {"config": cfg.to_dict()})
    write_json(run / "summary.json", {"status": status, "run_id": run_id, "steps": steps, "train_time_ms": ms})
    (run / "train.log").write_text(f"run: {run}  device: cuda:0  world_size: 8  grad_accum_steps: 1\n")
    if mtime is not None:
        os.utime(run / "summary.json", (mtime, mtime))
    return run


def test_throughput_measured_by_the_newest_matching_run(tmp_path, capsys):
    cfg = small_config(f"run.runs_dir={tmp_path}", "train.max_wallclock_seconds=600")
    _fake_run(tmp_path, "old", cfg, steps=100, ms=100_000.0, mtime=1_000)
    _fake_run(tmp_path, "new", cfg, steps=100, ms=50_000.0, mtime=2_000)  # 100 x 2048 tokens in 50 s
    _fake_run(tmp_path, "unfinished", cfg, status="running", mtime=3_000)
    _fake_run(tmp_path, "other-model", small_config("model.model_dim=128"), mtime=4_000)
    _fake_run(tmp_path, "other-batch", small_config("train.train_batch_tokens=4096"), mtime=5_000)
    found = measured_throughput(cfg)
    assert found["run"] == str(tmp_path / "new") and found["tokens_per_sec"] == pytest.approx(4096.0)
    assert found["device"] == "cuda:0 x 8"

    code = cli_main(["plan", "baseline", "--json", *SMALL, f"run.runs_dir={tmp_path}",
                     "train.max_wallclock_seconds=600"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["time"]["tokens_per_sec"] == pytest.approx(4096.0)
    assert "new" in plan["time"]["source"] and plan["time"]["steps_fit"] == 1200  # 600 s at 0.5 s per step


def test_no_matching_run_leaves_the_steps_open(tmp_path):
    plan = plan_config(small_config(f"run.runs_dir={tmp_path}"))
    assert plan["time"]["tokens_per_sec"] is None and plan["time"]["steps_fit"] is None
    assert any("--tokens-per-sec" in note for note in plan["size"]["notes"])


def test_json_plan_of_a_toml_preset(tmp_path, capsys):
    preset = tmp_path / "tiny.toml"
    preset.write_text('[model]\nvocab_size = 100\nnum_layers = 2\nmodel_dim = 64\nnum_heads = 4\nnum_kv_heads = 2\n'
                      '[train]\ntrain_seq_len = 32\ntrain_batch_tokens = 2048\nval_batch_size = 2048\n')
    code = cli_main(["plan", str(preset), "model.mlp_mult=3", "--tokens-per-sec", "4096", f"run.runs_dir={tmp_path}"])
    assert code == 0
    text = capsys.readouterr().out
    assert "estimate" in text and "Parameters" in text and "steps that fit" in text
    code = cli_main(["plan", str(preset), "--json", "model.mlp_mult=3", f"run.runs_dir={tmp_path}"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan) >= {"params", "depth", "tokens", "flops", "time", "size", "config", "seconds"}
    assert plan["params"]["mlp"] == 2 * 2 * (192 * 64) and plan["depth"] == {"unique": 2, "effective": 2}
    assert plan["tokens"] == {"seq_len": 32, "per_step": 2048}
    assert set(plan["flops"]["per_token"]) == {"forward", "backward", "total", "forward_matmul", "forward_attention"}
    assert plan["flops"]["per_step"]["total"] == plan["flops"]["per_token"]["total"] * 2048
    size = plan["size"]
    assert size["estimate"] is True and size["fits"] and size["total_bytes"] == size["model_bytes"] + size["code_bytes"]
    assert size["cap"] == 16_000_000 and size["model_bytes"] < sum(size["components_raw"].values())
    assert plan["config"] == {"preset": str(preset), "overrides": ["model.mlp_mult=3", f"run.runs_dir={tmp_path}"]}


def test_over_the_cap_exits_3_and_names_the_levers(tmp_path, monkeypatch, capsys):
    # A cap this small turns the tiny config into an over-cap one without compressing 16 MB.
    monkeypatch.setattr("pgolf.lab.plan.SIZE_CAP_BYTES", 50_000)
    code = cli_main(["plan", "baseline", *SMALL, "export.fp16_embedding=true", f"run.runs_dir={tmp_path}"])
    captured = capsys.readouterr()
    assert code == EXIT_OVER_CAP
    assert "OVER the 50,000-byte cap by" in captured.err and "an estimate" in captured.err
    assert "fewer parameters" in captured.err and "export.fp16_embedding=false" in captured.err
    assert "export.scheme=int6" in captured.err and "export.allocate=true" in captured.err
    assert "OVER" in captured.out  # the table says it too


@pytest.mark.slow
def test_baseline_at_width_1024_in_int8_is_over_the_cap(capsys):
    code = cli_main(["plan", "baseline", "model.model_dim=1024", "export.scheme=int8", "--json"])
    assert code == EXIT_OVER_CAP
    plan = json.loads(capsys.readouterr().out)
    assert plan["params"]["total"] > 60_000_000 and plan["size"]["overage"] > 0


def test_weights_drawn_later_in_training_cost_more_int8_bytes():
    # The official int8 floors row scales at 1/127: small early weights use few codes.
    cfg = small_config("model.model_dim=128", "model.num_heads=4", "model.mlp_hidden=1024", "model.vocab_size=1024")
    early = estimate_artifact(build_initial_model(cfg), cfg, 20, DEFAULT_LAWS)["model_bytes"]
    late = estimate_artifact(build_initial_model(cfg), cfg, 5000, DEFAULT_LAWS)["model_bytes"]
    assert late > 1.5 * early


def test_standard_draw_has_the_asked_kurtosis():
    gen = torch.Generator().manual_seed(0)
    for kurtosis in (2.5, 3.0, 4.0):
        z = standard_draw((1000, 1000), kurtosis, gen)
        assert z.var().item() == pytest.approx(1.0, abs=0.01)
        assert ((z ** 4).mean() / z.var() ** 2).item() == pytest.approx(kurtosis, rel=0.03)


# ------------------------------------------------------------- against a real trained run

TRAINED = ["model.num_layers=2", "model.model_dim=128", "model.num_heads=4", "model.num_kv_heads=2",
           "model.mlp_hidden=640", "train.train_batch_tokens=2048", "train.train_seq_len=64",
           "train.val_batch_size=4096", "train.max_wallclock_seconds=0", "train.warmup_steps=0",
           "train.val_loss_every=0", "train.val_max_tokens=4096", "train.iterations=30", "train.warmdown_iters=10"]


def trained_overrides(runs_dir: Path, *extra: str) -> list[str]:
    return ["data.source=shards", f"data.data_path={SHARED}",
            f"data.tokenizer_path={SHARED / 'fineweb_1024_bpe.model'}", f"run.runs_dir={runs_dir}", *TRAINED, *extra]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, one_cpu_thread):
    """A model whose embedding and MLP matrices are int8-quantized (more than 65,536 elements),
    trained 30 steps on the FineWeb sample: its real artifact is what the planner predicts."""
    if not SHARED.is_dir():
        pytest.skip("shared FineWeb sample not present")
    runs = tmp_path_factory.mktemp("plan-runs")
    cfg, _ = resolve_config(None, trained_overrides(runs), env={})
    summary = run_training(cfg, console=False)
    return runs, runs / summary["run_id"], summary


def _real_artifact_bytes(run_dir: Path, cfg) -> int:
    """The run's final weights exported under cfg's export settings, exactly as training does."""
    from pgolf.runs import latest_checkpoint

    model = build_initial_model(cfg)
    model.load_state_dict(torch.load(latest_checkpoint(run_dir / "checkpoints"), weights_only=True)["model"])
    plan = plan_export(model, cfg, [], torch.device("cpu"), 0)
    meta = {"run_id": run_dir.name, "config": cfg.to_dict()}
    e = cfg.export
    return len(pack_artifact(plan.qdict, meta=meta, compressor=e.compressor, storage=e.storage, layout=e.layout))


def test_estimate_within_5_percent_of_the_real_artifact(trained_run):
    runs, run_dir, summary = trained_run
    cfg, _ = resolve_config(None, trained_overrides(runs), env={})
    real = summary["size"]["model_bytes"]
    assert real == (run_dir / "model.pgolf").stat().st_size
    plan = plan_config(cfg)
    assert plan["size"]["weights"]["steps"] == 30
    assert plan["size"]["params_by_format"].get("int8", 0) > 250_000  # the int8 path is what is tested
    assert abs(plan["size"]["model_bytes"] / real - 1) < 0.05
    assert plan["size"]["code_bytes"] == summary["size"]["code_bytes"]
    # The same trained weights under per-row int6 (clip search): still within 5%.
    int6 = copy.deepcopy(cfg)
    set_key(int6, "export.scheme", "int6")
    assert abs(estimate_artifact(build_initial_model(int6), int6, 30, DEFAULT_LAWS)["model_bytes"]
               / _real_artifact_bytes(run_dir, int6) - 1) < 0.05


def test_plan_from_a_run_uses_its_measured_weights(trained_run, capsys):
    runs, run_dir, summary = trained_run
    laws, source = laws_from_run(run_dir)
    assert source["step"] == 30 and set(laws) == set(DEFAULT_LAWS)
    assert all(law.scale > 0 and math.isfinite(law.kurtosis) for law in laws.values())
    code = cli_main(["plan", "baseline", "--json", "--from", str(run_dir), *trained_overrides(runs)])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert str(run_dir) in plan["size"]["weights"]["source"]
    assert abs(plan["size"]["model_bytes"] / summary["size"]["model_bytes"] - 1) < 0.05
    # ...and the run's measured speed gives the steps row.
    assert plan["time"]["source"].startswith(f"measured by run {run_dir}")


def test_plan_from_a_run_without_checkpoint_is_explained(tmp_path):
    run = _fake_run(tmp_path, "bare", small_config())
    (run / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="no checkpoint"):
        laws_from_run(run)


def test_allocator_and_gptq_configs_are_planned_through_the_export(tmp_path):
    # No training shards at data.data_path: the allocator's Hessians come from random tokens.
    cfg = small_config(f"data.data_path={tmp_path / 'absent'}", f"run.runs_dir={tmp_path}", "model.model_dim=128",
                       "model.mlp_hidden=640", "export.allocate=true", "export.allocate_budget=200000",
                       "export.gptq=true")
    size = plan_config(cfg)["size"]
    assert any(line.startswith("calibration:") for line in size["export_lines"])
    assert any("allocate" in note for note in size["notes"]) and any("gptq" in note for note in size["notes"])
    # Four MLP matrices of 81,920 weights squeezed into 200,000 bytes: below 8 bits on average.
    int_params = {fmt: n for fmt, n in size["params_by_format"].items() if fmt.startswith("int")}
    assert sum(int_params.values()) == 4 * 81_920 and set(int_params) != {"int8"}
