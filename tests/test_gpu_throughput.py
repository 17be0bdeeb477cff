"""CPU smoke test of benchmarks/gpu_throughput.py: a tiny run measured end to end, and the
official side driven through a stand-in script that prints the official log lines."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest

from tests.train.test_train import TINY_MODEL, synthetic_overrides

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"
TINY = [*TINY_MODEL, "train.train_batch_tokens=1024", "train.train_seq_len=64", "train.val_batch_size=4096",
        "train.val_max_tokens=2048"]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A stand-in for train_gpt.py: checks the environment it is given and prints lines in the official
# format, 10 ms per step plus a 500 ms first step (which --skip 1 must exclude).
FAKE_OFFICIAL = textwrap.dedent('''
    import os, sys
    n = int(os.environ["ITERATIONS"])
    assert os.environ["TRAIN_LOG_EVERY"] == "1" and os.environ["VAL_LOSS_EVERY"] == "0", os.environ
    assert os.environ["NUM_LAYERS"] == "3" and os.environ["MODEL_DIM"] == "32" and os.environ["TIE_EMBEDDINGS"] == "1"
    assert os.path.isabs(os.environ["DATA_PATH"]) and os.environ["WARMUP_STEPS"] == "1"
    print("logs/x.txt")
    for step in range(1, n + 1):
        print(f"step:{step}/{n} train_loss:5.0000 train_time:{500 + 10 * (step - 1)}ms step_avg:1.00ms")
    print(f"step:{n}/{n} val_loss:4.0000 val_bpb:2.5000 train_time:0ms step_avg:0.00ms")
    print("peak memory allocated: 123 MiB reserved: 130 MiB")
''')


def test_cpu_smoke_with_a_stand_in_official_script(tmp_path, capsys):
    bench = load_benchmark()
    official = tmp_path / "train_gpt.py"
    official.write_text(FAKE_OFFICIAL)
    out = tmp_path / "bench.json"
    result = bench.main(["--config", "smoke", *synthetic_overrides(tmp_path), *TINY, "--steps", "3", "--skip", "1",
                         "--warmup", "1", "--peak-size", "128", "--peak-seconds", "0.05", "--device", "cpu",
                         "--official", str(official), "--json-out", str(out), "--runs-dir", str(tmp_path / "runs")])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    p = saved["pgolf"]
    assert p["steps_timed"] == 3 and p["ms_per_step"] > 0 and p["peak_memory_mib"] > 0
    assert p["tokens_per_s"] == pytest.approx(1024 * 1000 / p["ms_per_step"], rel=1e-3)
    # MFU's formula (its value depends on how busy the CPU was while measuring).
    assert p["mfu"] == pytest.approx(saved["flops_per_token"] * p["tokens_per_s"] / saved["matmul_peak_flops"],
                                     rel=1e-3)
    assert p["val_bpb"] > 0
    assert saved["flops_per_token"] > 6 * 3 * 12 * 32 * 32  # at least 6 x the block matmul weights
    assert saved["matmul_peak_dtype"] == "float32" and saved["matmul_peak_flops"] > 0
    o = saved["official"]
    assert o["ms_per_step"] == 10.0 and o["steps_timed"] == 3  # the 500 ms first step is skipped
    assert (o["val_bpb"], o["peak_memory_mib"]) == (2.5, 123.0)
    assert saved["speedup"] == pytest.approx(10.0 / p["ms_per_step"], abs=1e-4)  # both rounded in the JSON
    text = capsys.readouterr().out
    assert "ms/step" in text and "official" in text and "speedup" in text


def test_official_log_parsing_and_timing_window():
    bench = load_benchmark()
    times, bpb, peak = bench.parse_official_log(
        "step:1/3 train_loss:6.9 train_time:900ms step_avg:900.00ms\n"
        "step:2/3 train_loss:6.1 train_time:950ms step_avg:475.00ms\n"
        "step:3/3 train_loss:5.9 train_time:1010ms step_avg:336.67ms\n"
        "step:3/3 val_loss:5.8 val_bpb:3.4321 train_time:1010ms step_avg:336.67ms\n"
        "peak memory allocated: 10239 MiB reserved: 10400 MiB\n")
    assert times == {1: 900.0, 2: 950.0, 3: 1010.0} and bpb == 3.4321 and peak == 10239.0
    assert bench.ms_per_step(times, 1) == (55.0, 2)
    assert bench.ms_per_step(times, 0) == (1010.0 / 3, 3)
    with pytest.raises(RuntimeError, match="need more than --skip 3"):
        bench.ms_per_step(times, 3)
