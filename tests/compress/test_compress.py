"""The export plan: bit policies, clip search, GPTQ and the allocator wired to the config."""

import numpy as np
import pytest
import torch

from pgolf.compress.container import read_artifact
from pgolf.compress.policy import plan_export
from pgolf.config.resolve import resolve_config
from pgolf.data.shards import write_shard
from pgolf.model.gpt import GPT
from pgolf.compress.quant import dequantize_state_dict
from pgolf.train.run import run_training
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

WIDE = ["model.vocab_size=64", "model.num_layers=2", "model.model_dim=256", "model.mlp_mult=4",
        "model.num_heads=4", "model.num_kv_heads=2", "train.train_seq_len=32", "train.train_batch_tokens=256",
        "train.val_batch_size=256"]


def wide_model(seed=0):
    cfg, _ = resolve_config(None, WIDE, env={})
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return cfg, model


@pytest.fixture
def train_shard(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, rng.integers(0, 64, 20_000).astype(np.uint16))
    return [path]


def formats(qdict):
    return {n: (qt.kind, qt.bits) for n, qt in qdict.items()}


def test_policy_applies_to_the_intended_tensors_only(train_shard):
    cfg, model = wide_model()
    cfg.export.policy = [[r"mlp\.fc", 5], [r"mlp\.proj", 4]]
    plan = plan_export(model, cfg, train_shard, torch.device("cpu"), code_bytes=0)
    f = formats(plan.qdict)
    for i in range(2):
        assert f[f"blocks.{i}.mlp.fc.weight"] == ("int_per_row", 5)
        assert f[f"blocks.{i}.mlp.proj.weight"] == ("int_per_row", 4)
        # 256 x 256 = 65,536 elements: small enough for the official float passthrough.
        assert f[f"blocks.{i}.attn.c_q.weight"][0] == "float"
    assert f["tok_emb.weight"][0] == "float" and f["skip_weights"][0] == "float"


def test_scheme_sets_the_default_width(train_shard):
    cfg, model = wide_model()
    cfg.export.scheme = "int6"
    plan = plan_export(model, cfg, train_shard, torch.device("cpu"), code_bytes=0)
    assert formats(plan.qdict)["blocks.0.mlp.fc.weight"] == ("int_per_row", 6)


def test_gptq_replaces_rounding_and_reduces_output_error(train_shard):
    cfg, model = wide_model()
    cfg.export.scheme, cfg.export.gptq_seqs = "int4", 16
    plain = plan_export(model, cfg, train_shard, torch.device("cpu"), code_bytes=0)
    cfg.export.gptq = True
    gptq = plan_export(model, cfg, train_shard, torch.device("cpu"), code_bytes=0)
    assert any(line.startswith("gptq: 4 tensors") for line in gptq.lines)
    x = torch.randint(0, 64, (4, 32))

    def loss(qdict):
        m = GPT(cfg.model)
        m.load_state_dict(dequantize_state_dict(qdict))
        return m(x, x).item()

    reference = model(x, x).item()
    assert abs(loss(gptq.qdict) - reference) < abs(loss(plain.qdict) - reference)


def test_allocator_fits_the_budget_and_reports(train_shard):
    cfg, model = wide_model()
    matrices = 4 * 1024 * 256
    cfg.export.allocate, cfg.export.gptq_seqs = True, 8
    cfg.export.allocate_budget = int(matrices * 5 / 8) + 4 * 4 * 1024  # about int5 for all four
    plan = plan_export(model, cfg, train_shard, torch.device("cpu"), code_bytes=0)
    bits = [qt.bits for n, qt in plan.qdict.items() if qt.kind == "int_per_row"]
    assert len(bits) == 4 and max(bits) > min(bits) or set(bits) == {5}
    packed = sum(qt.data.numel() * qt.bits / 8 + 2 * qt.scale.numel()
                 for qt in plan.qdict.values() if qt.kind == "int_per_row")
    assert packed <= cfg.export.allocate_budget
    assert any("budget" in line.lower() for line in plan.lines)


def test_training_run_exports_with_policy_and_roundtrips(tmp_path):
    cfg = tiny_config(tmp_path, "train.iterations=2", "model.model_dim=256", "model.mlp_mult=4",
                      "model.num_heads=4", "model.num_kv_heads=2", "export.scheme=int6",
                      "export.policy=tok_emb:fp16", "export.compressor=lzma")
    summary = run_training(cfg, console=False)
    qdict, meta = read_artifact(tmp_path / "runs" / summary["run_id"] / "model.pgolf")
    assert formats(qdict)["blocks.0.mlp.fc.weight"] == ("int_per_row", 6)
    assert meta["config"]["export"]["policy"] == [["tok_emb", "fp16"]]
    assert summary["size"]["breakdown"] and sum(summary["size"]["breakdown"].values()) == summary["size"]["model_bytes"]


def test_small_tensors_keep_the_float_width_their_role_says():
    """The export reads parameter roles, not names: a new CONTROL parameter stays fp32 and a
    GATE parameter is stored as fp16, whatever they are called."""
    from pgolf.model.roles import Role, tag

    cfg, model = wide_model()
    model.new_gain = torch.nn.Parameter(torch.full((8,), 0.3))
    model.new_gate = torch.nn.Parameter(torch.full((8,), 0.3))
    tag(model, Role.CONTROL, "new_gain")
    tag(model, Role.GATE, "new_gate")
    qdict = plan_export(model, cfg, [], torch.device("cpu"), code_bytes=0).qdict
    assert qdict["new_gain"].data.dtype == torch.float32 and qdict["new_gate"].data.dtype == torch.float16
    assert qdict["blocks.0.attn_scale"].data.dtype == torch.float32  # CONTROL, as the official patterns say
    assert qdict["tok_emb.weight"].data.dtype == torch.float16  # EMBEDDING, small here: the official fp16
