"""Mixed-bit allocator: never over budget, bits follow sensitivity, clear errors."""
import itertools
import math
import random

import pytest
import torch

from pgolf.compress.allocate import allocate_bits, measured_sensitivity, sensitivity_table, tensor_bytes
from pgolf.config import ModelConfig
from pgolf.model.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CHOICES = (8, 6, 5, 4)


def random_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    return {f"t{i}": torch.randn(rng.randint(2, 24), rng.randint(4, 48), generator=g) * rng.uniform(0.01, 1.0)
            for i in range(rng.randint(1, 6))}


def bytes_at(tensors, bits):
    return sum(tensor_bytes(tuple(t.shape), bits) for t in tensors.values())


def test_tensor_bytes():
    assert tensor_bytes((10, 7), 8) == 70 + 20
    assert tensor_bytes((10, 7), 5) == math.ceil(350 / 8) + 20
    assert tensor_bytes((10, 7), 4) == 35 + 20
    assert tensor_bytes((10, 7), "fp16") == 140
    assert tensor_bytes((9,), 6) == math.ceil(54 / 8) + 2


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("method", ["auto", "greedy"])
def test_never_exceeds_budget(seed, method):
    tensors = random_tensors(seed)
    rng = random.Random(1000 + seed)
    diag = ({n: torch.rand(t.shape[1], generator=torch.Generator().manual_seed(seed)) * 10
             for n, t in tensors.items()} if seed % 2 else None)
    table = sensitivity_table(tensors, CHOICES, diag)
    fixed, overhead = {}, rng.choice([0, 0, 17, 1000])
    if len(tensors) > 1 and seed % 3 == 0:
        fixed = {"t0": rng.choice([8, 4, "fp16"])}
    fixed_bytes = sum(tensor_bytes(tuple(tensors[n].shape), b) for n, b in fixed.items())
    free = {n: t for n, t in tensors.items() if n not in fixed}
    lo = bytes_at(free, 4) + fixed_bytes + overhead
    hi = bytes_at(free, 8) + fixed_bytes + overhead
    for budget in [lo, hi] + [rng.randint(lo, hi + 50) for _ in range(8)]:
        a = allocate_bits(tensors, budget, CHOICES, fixed=fixed, overhead_bytes=overhead, sensitivity=table,
                          method=method)
        assert a.total_bytes <= budget
        assert a.total_bytes == sum(a.bytes.values()) + overhead
        for n, b in a.bits.items():
            assert a.bytes[n] == tensor_bytes(tuple(tensors[n].shape), b)
            assert b == fixed[n] if n in fixed else b in CHOICES
        # No single upgrade that lowers sensitivity still fits in the slack.
        for n in free:
            for b in CHOICES:
                extra = tensor_bytes(tuple(tensors[n].shape), b) - a.bytes[n]
                if table[n][b] < a.sensitivity[n]:
                    assert extra > a.slack_bytes
    with pytest.raises(ValueError, match=f"minimum achievable is {lo:,} bytes"):
        allocate_bits(tensors, lo - 1, CHOICES, fixed=fixed, overhead_bytes=overhead, sensitivity=table,
                      method=method)


def brute_force(tensors, table, budget):
    names = list(tensors)
    return min(sum(table[n][b] for n, b in zip(names, combo))
               for combo in itertools.product(CHOICES, repeat=len(names))
               if sum(tensor_bytes(tuple(tensors[n].shape), b) for n, b in zip(names, combo)) <= budget)


def test_exact_is_optimal_and_greedy_close():
    ratios = []
    for seed in range(30):
        tensors = random_tensors(100 + seed)
        table = sensitivity_table(tensors, CHOICES)
        budget = random.Random(seed).randint(bytes_at(tensors, 4), bytes_at(tensors, 8))
        best = brute_force(tensors, table, budget)
        exact = allocate_bits(tensors, budget, CHOICES, sensitivity=table, method="exact")
        assert exact.total_sensitivity == pytest.approx(best, rel=1e-9)
        auto = allocate_bits(tensors, budget, CHOICES, sensitivity=table)
        assert auto.bits == exact.bits
        greedy = allocate_bits(tensors, budget, CHOICES, sensitivity=table, method="greedy")
        assert greedy.total_sensitivity >= best * (1 - 1e-9)
        ratios.append(greedy.total_sensitivity / best)
    assert sorted(ratios)[len(ratios) // 2] < 1.05  # median: greedy usually (near-)optimal


def test_auto_falls_back_to_greedy_on_a_huge_frontier():
    tensors = random_tensors(11)
    budget = (bytes_at(tensors, 4) + bytes_at(tensors, 8)) // 2
    a = allocate_bits(tensors, budget, max_frontier=1)
    assert a.method.startswith("greedy") and a.total_bytes <= budget
    assert allocate_bits(tensors, budget).method.startswith("exact")
    with pytest.raises(ValueError, match="method"):
        allocate_bits(tensors, budget, method="magic")


def test_model_sized_problem_is_fast_and_exact():
    # The official 9-layer model's matrices: the frontier stays small thanks to equal shapes.
    shapes = {"c_q": (512, 512), "c_k": (256, 512), "c_v": (256, 512), "proj": (512, 512),
              "fc": (1024, 512), "mlp_proj": (512, 1024)}
    sizes = {f"blocks.{i}.{k}": s for i in range(9) for k, s in shapes.items()}
    rng = random.Random(0)
    table = {}
    for n in sizes:
        base = rng.uniform(0.5, 2.0)
        table[n] = {b: base * 4.0 ** (8 - b) for b in CHOICES}  # ~4x error per bit removed
    tensors = {n: torch.empty(s) for n, s in sizes.items()}
    budget = (bytes_at(tensors, 5) + bytes_at(tensors, 6)) // 2
    a = allocate_bits(tensors, budget, sensitivity=table)
    g = allocate_bits(tensors, budget, sensitivity=table, method="greedy")
    assert a.method.startswith("exact") and a.total_bytes <= budget and g.total_bytes <= budget
    assert a.total_sensitivity <= g.total_sensitivity * (1 + 1e-12)
    assert len(set(a.bits.values())) >= 2


def test_all_eight_bits_when_budget_allows():
    tensors = random_tensors(7)
    full = bytes_at(tensors, 8)
    for budget in (full, full + 12345):
        a = allocate_bits(tensors, budget)
        assert set(a.bits.values()) == {8} and a.total_bytes == full and a.lowered_steps == 0


def test_more_bits_where_sensitivity_is_higher():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    tensors = {"a": w.clone(), "b": w.clone()}
    diag = {"a": torch.full((32,), 100.0), "b": torch.ones(32)}
    budget = tensor_bytes((16, 32), 8) + tensor_bytes((16, 32), 4)
    a = allocate_bits(tensors, budget, hessian_diag=diag)
    assert (a.bits["a"], a.bits["b"]) == (8, 4)
    a = allocate_bits(tensors, budget, hessian_diag={"a": diag["b"], "b": diag["a"]})
    assert (a.bits["a"], a.bits["b"]) == (4, 8)
    # Unweighted: the tensor with the larger values has the larger rounding error.
    a = allocate_bits({"small": w * 0.01, "big": w}, budget)
    assert (a.bits["small"], a.bits["big"]) == (4, 8)
    # Over many budgets the sensitive tensor never gets fewer bits.
    lo, hi = 2 * tensor_bytes((16, 32), 4), 2 * tensor_bytes((16, 32), 8)
    for budget in range(lo, hi + 1, 17):
        a = allocate_bits(tensors, budget, hessian_diag=diag)
        assert a.bits["a"] >= a.bits["b"]


def test_fixed_and_overhead():
    tensors = random_tensors(3)
    tensors["emb"] = torch.randn(40, 16)
    tensors["bias"] = torch.randn(16)
    fixed = {"emb": "fp16", "bias": "fp16", "t0": 5}
    huge = 10**9
    a = allocate_bits(tensors, huge, fixed=fixed, overhead_bytes=999)
    assert a.bits["emb"] == "fp16" and a.bytes["emb"] == 2 * 40 * 16 and a.bits["t0"] == 5
    assert a.bytes["bias"] == 32 and a.bits_for("emb") is None and a.bits_for("t0") == 5
    assert a.total_bytes == sum(a.bytes.values()) + 999
    assert set(a.fixed) == set(fixed)
    assert all(a.bits[n] == 8 for n in tensors if n not in fixed)
    with pytest.raises(ValueError, match="not in tensors"):
        allocate_bits(tensors, huge, fixed={"ghost": 8})
    with pytest.raises(ValueError, match="2-D"):
        allocate_bits(tensors, huge, fixed={"emb": "fp16"})  # 1-D "bias" must be fixed


def test_errors_and_report():
    tensors = random_tensors(5)
    with pytest.raises(ValueError, match="hessian_diag lacks"):
        allocate_bits(tensors, 10**9, hessian_diag={})
    with pytest.raises(ValueError, match="sensitivity table lacks"):
        allocate_bits(tensors, 10**9, sensitivity={n: {8: 1.0} for n in tensors})
    budget = (bytes_at(tensors, 4) + bytes_at(tensors, 8)) // 2
    a = allocate_bits(tensors, budget)
    text = a.table()
    for n, t in tensors.items():
        assert n in text and "x".join(map(str, t.shape)) in text
    assert f"budget {budget:,}" in text and len(a.lines()) == len(tensors) + 2
    d = a.to_dict()
    assert d["total_bytes"] == a.total_bytes <= budget and d["bits"] == a.bits


def test_measured_sensitivity_drives_allocation():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))]
    names = ["blocks.0.attn.c_q.weight", "blocks.1.mlp.fc.weight"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    table = measured_sensitivity(model, batches, names)
    assert set(table) == set(names) and all(set(v) == set(CHOICES) for v in table.values())
    assert all(v >= 0 and math.isfinite(v) for row in table.values() for v in row.values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # weights restored
    sd = model.state_dict()
    tensors = {n: sd[n] for n in names}
    a = allocate_bits(tensors, bytes_at(tensors, 6), sensitivity=table)
    assert a.total_bytes <= bytes_at(tensors, 6)
