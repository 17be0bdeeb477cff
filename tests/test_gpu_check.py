"""benchmarks/gpu_check.py on CPU: its --dry-run runs the GPU plan end to end (tiny shapes, a
stand-in official script, zstandard and brotli made unimportable as on the GPU image), a budget
too small for anything skips every stage with its reason and still writes both files, and the
pieces the GPU run depends on (the deadline kill, the budget shares, the training checks, the
lever verdicts) do what they say."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SHARED = ROOT.parent / "shared" / "data" / "fineweb_sp1024_sample"
needs_sample = pytest.mark.skipif(not SHARED.is_dir(), reason="shared FineWeb sample not present")

# A stand-in for openai/parameter-golf's train_gpt.py: checks the environment it is given and
# prints the official log lines, 10 ms per step after a 500 ms first step.
FAKE_OFFICIAL = textwrap.dedent('''
    import os
    n = int(os.environ["ITERATIONS"])
    assert os.environ["TRAIN_LOG_EVERY"] == "1" and os.environ["VAL_LOSS_EVERY"] == "0", os.environ
    assert os.environ["WARMUP_STEPS"] == "1" and float(os.environ["MAX_WALLCLOCK_SECONDS"]) == 0, os.environ
    assert os.path.isabs(os.environ["DATA_PATH"]) and os.path.isfile(os.environ["TOKENIZER_PATH"])
    for step in range(1, n + 1):
        print(f"step:{step}/{n} train_loss:5.0000 train_time:{500 + 10 * (step - 1)}ms step_avg:1.00ms")
    print(f"step:{n}/{n} val_loss:4.0000 val_bpb:2.5000 train_time:0ms step_avg:0.00ms")
    print("peak memory allocated: 123 MiB reserved: 130 MiB")
    print("final_int8_zlib_roundtrip_exact val_loss:4.00100000 val_bpb:2.50100000")
''')


def load_check():
    if "gpu_check" not in sys.modules:  # its dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.fixture
def without_optional_compressors(tmp_path, monkeypatch):
    """Workers (subprocesses) find zstandard and brotli unimportable, as on the GPU image."""
    fake = tmp_path / "no_optional_compressors"
    fake.mkdir()
    for name in ("zstandard", "brotli"):
        (fake / f"{name}.py").write_text(f"raise ImportError('{name} is not installed on the GPU image')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])))


def assert_every_stage_accounted(report: dict, check) -> None:
    assert list(report["stages"]) == list(check.STAGES)
    for key, stage in report["stages"].items():
        assert stage["status"] in ("ran", "skipped", "failed"), key
        if stage["status"] != "ran":
            assert stage["reason"], key
        for unit in stage["units"]:
            assert unit["status"] in ("ran", "skipped", "failed") and (unit["status"] == "ran" or unit["reason"])


@needs_sample
def test_dry_run_runs_the_plan_and_writes_both_files(tmp_path, capsys, without_optional_compressors):
    check = load_check()
    official = tmp_path / "train_gpt.py"
    official.write_text(FAKE_OFFICIAL)
    out = tmp_path / "out"
    report = check.main(["--dry-run", "--out", str(out), "--work", str(tmp_path / "work"), "--data", str(SHARED),
                         "--official", str(official), "--budget-seconds", "900", "--presets", "baseline",
                         "--levers", "compile,parallel_muon", "--schemes", "int8,int6_gptq,mixed"])
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved == json.loads(json.dumps(report, default=str))
    assert_every_stage_accounted(saved, check)
    stages = saved["stages"]
    assert all(stages[k]["status"] == "ran" for k in check.STAGES), {k: s["reason"] for k, s in stages.items()}

    env = stages["env"]["summary"]
    assert env["versions"]["compressors"] == ["zlib", "lzma"]  # the workers ran without zstandard and brotli
    assert finite(env["matmul_peak"]["flops"]) and env["matmul_peak"]["flops"] > 0
    (sdpa,) = env["sdpa"]
    assert sdpa["shape"]["presets"] == ["baseline"] and finite(sdpa["ms"]["math"]) and sdpa["fastest"]
    assert set(env["kernels"]) == {"torch varlen_attn", "flash_attn_interface (FA3)", "flash_attn (FA2)",
                                   "flex_attention"}

    (smoke,) = stages["presets"]["units"]
    r = smoke["result"]
    assert smoke["name"] == "baseline" and smoke["status"] == "ran" and r["problems"] == []
    assert r["finite_losses"] is True and r["recompiles"] == 0 and r["steps"] == r["iterations"] == 3
    assert r["steps_timed"] == 2 and finite(r["ms_per_step"], r["peak_memory_mib"], r["startup_s"])
    assert r["tokens_per_s"] == pytest.approx(1024 * 1000 / r["ms_per_step"], rel=1e-3)
    assert finite(r["pre_quant_bpb"], r["roundtrip_bpb"], r["flops_per_token"]) and r["total_bytes"] > 0

    official_stage = stages["official"]
    comparison = official_stage["summary"]["comparison"]
    pgolf, theirs = comparison["sides"]["pgolf"], comparison["sides"]["official"]
    assert official_stage["units"][0]["reused"]  # the smoke scored the same tokens: not run twice
    assert theirs["ms_per_step"] == 10.0 and theirs["val_bpb"] == 2.5 and theirs["roundtrip_bpb"] == 2.501
    assert comparison["speedup"] == pytest.approx(10.0 / pgolf["ms_per_step"], abs=1e-4)  # rounded in the JSON
    assert comparison["delta_bpb"] == pytest.approx(pgolf["val_bpb"] - 2.5, abs=1e-4)
    levers = {row["lever"]: row for row in official_stage["summary"]["levers"]}
    assert levers["compile"]["status"] == "ran" and finite(levers["compile"]["ms_on"], levers["compile"]["ms_off"])
    assert levers["compile"]["ms_on"] == pgolf["ms_per_step"]  # the default (reference) is the "on" side
    assert levers["parallel_muon"]["status"] == "skipped" and "GPUs" in levers["parallel_muon"]["reason"]

    rows = stages["eval"]["summary"]["rows"]
    assert [row["mode"] for row in rows] == ["standard", "sliding stride 64", "TTT (stride 64)"]
    for row in rows:
        assert row["status"] == "ran" and finite(row["val_bpb"], row["tokens_per_s"], row["seconds"])
        assert row["full_split_8gpu_s"] == pytest.approx(check.FULL_VAL_TARGETS / row["tokens_per_s"] / 8, rel=1e-3)

    compression = stages["compression"]["summary"]
    assert finite(compression["unquantized_val_bpb"])
    assert [row["scheme"] for row in compression["rows"]] == ["int8 (official)", "int6 + GPTQ",
                                                              "attn int6 / mlp int5 + GPTQ"]
    for row in compression["rows"]:
        assert row["status"] == "ran" and row["compressor"] == "lzma" and row["bytes"] > 0
        assert row["quantized_params"] > 0 and finite(row["bytes_per_param"], row["delta_bpb"])

    md = (out / "gpu_check.md").read_text()
    assert "| stage | status | seconds | allotted s | units ran / failed / skipped |" in md
    assert all(stage["title"] in md for stage in stages.values())
    assert "| baseline | ran |" in md and "| pgolf | ran |" in md and "| int6 + GPTQ | ran |" in md
    assert md in capsys.readouterr().out  # printed last, for a reply that shows only the end
    assert (out / "gpu_check.log").is_file() and sorted(p.name for p in out.iterdir()) == [
        "gpu_check.json", "gpu_check.log", "gpu_check.md"]  # few files: what comes back from the GPU machine


@needs_sample
def test_a_budget_too_small_skips_every_stage_with_its_reason_and_writes_both_files(tmp_path):
    check = load_check()
    out = tmp_path / "out"
    report = check.main(["--dry-run", "--out", str(out), "--work", str(tmp_path / "work"), "--data", str(SHARED),
                         "--official", str(tmp_path / "missing.py"), "--budget-seconds", "1"])
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["stages"] == json.loads(json.dumps(report["stages"]))
    assert_every_stage_accounted(saved, check)
    for key, stage in saved["stages"].items():
        assert stage["status"] == "skipped" and "time" in stage["reason"], (key, stage["reason"])
    md = (out / "gpu_check.md").read_text()
    assert "| 2. Preset smokes | skipped: time ran out" in md and "| 5. Compression targets | skipped: time" in md


def test_missing_data_and_official_script_are_named(tmp_path):
    check = load_check()
    out = tmp_path / "out"
    report = check.main(["--dry-run", "--out", str(out), "--work", str(tmp_path / "work"), "--data",
                         str(tmp_path / "nowhere"), "--budget-seconds", "60", "--stages", "presets,official"])
    stages = report["stages"]
    assert stages["env"]["reason"] == "not selected (--stages)"
    for key in ("presets", "official", "eval", "compression"):
        reason = stages[key]["reason"]
        assert stages[key]["status"] == "skipped" and (reason == "not selected (--stages)" or "no data" in reason)
    assert "--data DIR" in stages["presets"]["reason"] and (out / "gpu_check.md").is_file()


def test_a_unit_past_its_deadline_is_killed_with_its_children_and_keeps_what_it_wrote(tmp_path):
    check = load_check()
    code = textwrap.dedent('''
        import subprocess, sys, time
        open("partial.json", "w").write('{"part": 1}')
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open("child.pid", "w").write(str(child.pid))
        print("working", flush=True)
        time.sleep(120)
    ''')
    start = time.perf_counter()
    rc, seconds = check.run_process([sys.executable, "-c", code], tmp_path, dict(os.environ), 3.0, tmp_path / "log")
    assert rc is None and 3.0 <= seconds < 20 and time.perf_counter() - start < 30
    assert check.read_json_file(tmp_path / "partial.json") == {"part": 1}
    assert check.log_tail(tmp_path / "log") == ["working"]
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(50):  # the grandchild went with the group: gone, or a zombie awaiting its reaper
        state = Path(f"/proc/{child}/status")
        if not state.exists() or "zombie" in state.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {child} outlived the killed unit")


def test_each_stage_gets_its_share_of_what_is_left_and_unused_time_passes_on():
    check = load_check()
    now = [0.0]
    budget = check.Budget(100.0, clock=lambda: now[0])
    stages = list(check.STAGES)
    assert budget.allot("env", stages) == pytest.approx(100.0 * check.WEIGHTS["env"])
    stage = check.Stage("env", budget, budget.allot("env", stages))
    now[0] = 2.0  # env used 2 s of its share; the rest is shared by the stages after it
    assert stage.left() == pytest.approx(check.WEIGHTS["env"] * 100.0 - 2.0)
    later = stages[1:]
    assert budget.allot("presets", later) == pytest.approx(98.0 * check.WEIGHTS["presets"]
                                                           / sum(check.WEIGHTS[s] for s in later))
    assert budget.allot("compression", ["compression"]) == pytest.approx(98.0)
    now[0] = 150.0
    assert budget.left() == 0.0 and stage.left() == 0.0


def test_training_checks_read_a_run_directory(tmp_path):
    check = load_check()
    from pgolf.config.resolve import resolve_config

    cfg, _ = resolve_config("baseline", ["train.iterations=4"], env={})
    run = tmp_path / "run"
    run.mkdir()
    events = [{"event": "train", "step": s, "train_loss": loss, "train_time_ms": 100.0 * s, "time": 10.0 + s}
              for s, loss in ((1, 6.9), (2, 6.5), (3, float("nan")), (4, 6.0))]
    events.insert(3, {"event": "recompile", "step": 3, "graphs": 2, "time": 13.0})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n{\"cut sh")
    (run / "train.log").write_text("model_params: 17,059,912  layers: 9\nsdpa_backend: flash (fastest of ...)\n"
                                   "compile: True\n")
    (run / "summary.json").write_text(json.dumps({"status": "failed", "stop_reason": "non_finite_loss"}))
    r = check.read_train_run(run, cfg, skip=1, started=9.0)
    assert (r["steps"], r["ms_per_step"], r["steps_timed"], r["startup_s"]) == (4, 100.0, 3, 2.0)
    assert r["tokens_per_s"] == pytest.approx(524_288 * 10)
    assert (r["model_params"], r["sdpa_backend"], r["compiled"], r["recompiles"]) == (17_059_912, "flash", "True", 2)
    assert r["finite_losses"] is False
    assert r["problems"] == ["non-finite training loss", "2 graph(s) recompiled after warmup",
                             "run status failed (non_finite_loss)"]
    (run / "summary.json").write_text(json.dumps({"status": "interrupted", "stop_reason": "interrupt_at_step"}))
    assert check.read_train_run(run, cfg, 1, 9.0, train_only=True)["problems"][-1].startswith("2 graph(s)")


def test_lever_verdicts_compare_the_switch_on_with_it_off():
    check = load_check()
    stage = check.Stage("official", check.Budget(10.0), 10.0)
    ref = {"name": "pgolf baseline", "status": "ran", "result": {"ms_per_step": 100.0, "peak_memory_mib": 900.0}}
    stage.units += [ref,
                    {"name": "lever fused_loss", "status": "ran",
                     "result": {"ms_per_step": 90.0, "peak_memory_mib": 500}},
                    {"name": "lever compile", "status": "ran", "result": {"ms_per_step": 101.0}},
                    {"name": "lever prefetch", "status": "ran", "result": {"ms_per_step": 80.0}},
                    check.skipped("lever parallel_muon", "needs 2+ GPUs")]
    rows = {row["lever"]: row for row in check.lever_rows(stage, ref)}
    assert (rows["fused_loss"]["ms_on"], rows["fused_loss"]["ms_off"]) == (90.0, 100.0)  # its variant is "on"
    assert rows["fused_loss"]["verdict"].startswith("pays") and rows["fused_loss"]["memory_on"] == 500
    assert rows["compile"]["verdict"].startswith("no difference")  # within 2 %
    assert (rows["prefetch"]["ms_on"], rows["prefetch"]["ms_off"]) == (100.0, 80.0)  # the default is "on"
    assert rows["prefetch"]["verdict"].startswith("costs")
    assert rows["parallel_muon"]["status"] == "skipped" and "verdict" not in rows["parallel_muon"]


@pytest.mark.slow
@needs_sample
def test_the_default_dry_run_plan_smokes_every_preset(tmp_path, without_optional_compressors):
    """Every preset of configs/, every lever and scheme, with a budget that leaves none out
    (several minutes on a 2-core CPU)."""
    check = load_check()
    official = tmp_path / "train_gpt.py"
    official.write_text(FAKE_OFFICIAL)
    report = check.main(["--dry-run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                         "--data", str(SHARED), "--official", str(official), "--budget-seconds", "3600"])
    assert_every_stage_accounted(report, check)
    smokes = {u["name"]: u for u in report["stages"]["presets"]["units"]}
    assert list(smokes) == check.all_presets() and smokes and list(smokes)[:2] == ["baseline", "pr549"]
    for name, unit in smokes.items():
        r = unit["result"]
        assert unit["status"] == "ran" and r["problems"] == [], (name, unit.get("reason"))
        assert finite(r["ms_per_step"], r["roundtrip_bpb"]) and r["total_bytes"] > 0, name
    levers = {row["lever"]: row for row in report["stages"]["official"]["summary"]["levers"]}
    assert set(levers) == set(check.LEVERS)
    assert all(row["status"] == "ran" for key, row in levers.items() if key != "parallel_muon"), levers
    rows = report["stages"]["compression"]["summary"]["rows"]
    assert [row["status"] for row in rows] == ["ran"] * len(check.SCHEMES)
