"""Score-first test-time training: the learning-rate schedule, the receipt it writes (and the
audit that accepts it), that every chunk is scored before any update uses it (down to the
exact numbers), the deliberately illegal variant failing the audit, frozen blocks, and lr=0
reducing to a plain sliding evaluation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import pgolf.eval.ttt as ttt_module
from pgolf.eval.windows import ScoreSums, score_windows, window_plan
from pgolf.eval.run import load_target
from pgolf.model.gpt import build_model
from pgolf.eval.audit import AuditFailure, audit_file, audit_receipt
from pgolf.eval.receipt import receipt_digest, state_fingerprint, write_receipt
from pgolf.data.tokenizer import ByteTokenizer
from pgolf.train.run import run_training
from pgolf.eval.ttt import TTTConfig, chunk_lr, run_ttt
from tests.train.test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CPU = torch.device("cpu")
SEQ_LEN = 64
STRIDE = 16
CHUNK = 512
N_TOKENS = 2901  # 2900 targets: chunks (0, 512], ..., (2048, 2560], (2560, 2900]
BOUNDS = [0, 512, 1024, 1536, 2048, 2560, 2900]
BATCH = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, state dict, val tokens, luts) of a tiny model trained on the synthetic corpus."""
    tmp = tmp_path_factory.mktemp("ttt")
    summary = run_training(tiny_config(tmp, "train.iterations=12", "train.val_loss_every=0", "run.run_id=tiny"),
                           console=False)
    assert summary["status"] == "done"
    cfg, state, _, _ = load_target(str(tmp / "runs" / "tiny"), live=False)
    from pgolf.data.shards import load_validation_tokens

    tokens = load_validation_tokens(cfg.val_files(), SEQ_LEN)[:N_TOKENS]
    luts = ByteTokenizer().byte_luts(cfg.model.vocab_size).to_torch("cpu")
    return cfg, state, tokens, luts


def fresh_model(trained):
    cfg, state, _, _ = trained
    model = build_model(cfg.model, CPU)
    model.load_state_dict(copy.deepcopy(state))
    return model


def ttt_config(**overrides) -> TTTConfig:
    return TTTConfig(**{"chunk_tokens": CHUNK, "lr": 0.05, "epochs": 2, "batch_seqs": 4, **overrides})


def do_ttt(trained, cfg=None, tokens=None, **kwargs):
    model = fresh_model(trained)
    tokens = trained[2] if tokens is None else tokens
    sums, receipt = run_ttt(model, tokens, trained[3], SEQ_LEN, STRIDE, BATCH, cfg or ttt_config(), CPU, **kwargs)
    return model, sums, receipt


def scores(receipt):
    return [e for e in receipt.events if e["type"] == "score"]


def updates(receipt):
    return [e for e in receipt.events if e["type"] == "update"]


def plain_chunk(model, trained, lo, hi) -> ScoreSums:
    tokens, luts = trained[2], trained[3]
    return score_windows(model, tokens, window_plan(tokens.numel() - 1, SEQ_LEN, STRIDE, lo, hi), luts, CPU, BATCH)


# --- learning-rate schedule ----------------------------------------------------------------

def test_chunk_lr_is_a_cosine_from_lr_to_zero():
    cfg = TTTConfig(lr=0.1)
    got = [chunk_lr(cfg, n, 5) for n in range(5)]
    expected = [0.1, 0.05 * (1 + math.sqrt(0.5)), 0.05, 0.05 * (1 - math.sqrt(0.5)), 0.0]
    assert got == pytest.approx(expected, abs=1e-15)
    assert chunk_lr(cfg, 1, 3) == pytest.approx(0.05, abs=1e-15)
    assert [chunk_lr(cfg, n, 2) for n in range(2)] == pytest.approx([0.1, 0.0], abs=1e-15)
    assert chunk_lr(cfg, 0, 1) == 0.1  # a single chunk is never trained on anyway
    many = [chunk_lr(cfg, n, 101) for n in range(101)]
    assert many[50] == pytest.approx(0.05, abs=1e-15)
    assert all(a > b for a, b in zip(many, many[1:]))


def test_run_ttt_trains_chunk_n_at_chunk_lr(trained, monkeypatch):
    seen = []
    real = ttt_module.adapt_on_chunk

    def spy(model, tokens, lo, hi, seq_len, cfg, optimizer, params, *args):
        seen.append((lo, hi, optimizer.param_groups[0]["lr"]))
        return real(model, tokens, lo, hi, seq_len, cfg, optimizer, params, *args)

    monkeypatch.setattr(ttt_module, "adapt_on_chunk", spy)
    cfg = ttt_config(epochs=1)
    do_ttt(trained, cfg)
    n = len(BOUNDS) - 1
    assert [(lo, hi) for lo, hi, _ in seen] == list(zip(BOUNDS[:-2], BOUNDS[1:-1]))
    assert [lr for _, _, lr in seen] == pytest.approx([chunk_lr(cfg, k, n) for k in range(n - 1)], abs=0)


# --- the receipt ----------------------------------------------------------------------------

def test_ttt_receipt_passes_the_audit_and_chains_states(trained, tmp_path):
    before = fresh_model(trained)
    initial = state_fingerprint(before)
    snapshots = []  # the state after chunk n was scored and (except the last) trained on

    def progress(n, total, sums):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    model = fresh_model(trained)
    sums, receipt = run_ttt(model, trained[2], trained[3], SEQ_LEN, STRIDE, BATCH, ttt_config(), CPU,
                            progress=progress)
    n = len(BOUNDS) - 1
    assert len(snapshots) == n
    # Event order: score 0, update 0, score 1, update 1, ..., score n-1.
    assert [e["type"] for e in receipt.events] == ["score", "update"] * (n - 1) + ["score"]
    assert [(e["lo"], e["hi"]) for e in scores(receipt)] == list(zip(BOUNDS[:-1], BOUNDS[1:]))
    assert [(e["lo"], e["hi"]) for e in updates(receipt)] == list(zip(BOUNDS[:-2], BOUNDS[1:-1]))
    assert len(updates(receipt)) == n - 1
    assert receipt.kind == "ttt" and receipt.total_targets == N_TOKENS - 1
    assert receipt.settings["chunks"] == n and receipt.settings["stride"] == STRIDE
    # The first chunk is scored by the initial (unadapted) state...
    assert receipt.initial_state == initial == scores(receipt)[0]["state"]
    for k, (s, u) in enumerate(zip(scores(receipt), updates(receipt))):
        assert u["before"] == s["state"]  # scoring leaves the model alone
        assert u["after"] != u["before"]  # the update changed it
        assert scores(receipt)[k + 1]["state"] == u["after"]  # ...and chunk k+1 is scored by it
    assert state_fingerprint(model) == updates(receipt)[-1]["after"]  # the last chunk is never trained on
    # The fingerprints are of the real states: chunk k is scored, to the bit, by the snapshot
    # taken after chunk k-1's update.
    for k in range(1, n):
        state_model = fresh_model(trained)
        state_model.load_state_dict(snapshots[k - 1])
        assert state_fingerprint(state_model) == scores(receipt)[k]["state"]
        lo, hi = BOUNDS[k], BOUNDS[k + 1]
        part = plain_chunk(state_model, trained, lo, hi)
        e = scores(receipt)[k]
        assert (e["loss_sum"], e["tokens"], e["bytes"]) == (part.loss_sum, part.tokens, part.bytes)
    # Sums and totals agree, and the written receipt passes the audit.
    totals = receipt.totals
    assert (totals["loss_sum"], totals["tokens"], totals["bytes"]) == (sums.loss_sum, sums.tokens, sums.bytes)
    assert sums.tokens == N_TOKENS - 1
    assert sums.bytes == sum(e["bytes"] for e in scores(receipt))
    path = write_receipt(tmp_path / "ttt.json", receipt)
    report = audit_file(path)
    assert (report.kind, report.scored_targets, report.updates) == ("ttt", N_TOKENS - 1, n - 1)
    assert report.val_bpb == totals["val_bpb"]
    assert audit_receipt({**receipt.body(), "sha256": receipt_digest(receipt.body())}) == report


def test_chunk_zero_is_scored_before_any_update(trained):
    model, sums, receipt = do_ttt(trained)
    untouched = fresh_model(trained)
    first = plain_chunk(untouched, trained, 0, CHUNK)
    e = scores(receipt)[0]
    assert (e["loss_sum"], e["tokens"], e["bytes"]) == (first.loss_sum, first.tokens, first.bytes)
    # Adapting changed the weights, and so the later chunks' scores.
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), untouched.parameters()))
    assert state_fingerprint(model) != state_fingerprint(untouched)
    for k in range(1, len(BOUNDS) - 1):
        plain = plain_chunk(untouched, trained, BOUNDS[k], BOUNDS[k + 1])
        e = scores(receipt)[k]
        assert (e["tokens"], e["bytes"]) == (plain.tokens, plain.bytes)
        assert e["loss_sum"] != pytest.approx(plain.loss_sum, rel=1e-7)
    # The run leaves every parameter trainable again.
    assert all(p.requires_grad for p in model.parameters())


def test_future_tokens_never_influence_earlier_scores(trained):
    """Rewrite every token after chunk 3's start: chunks 0-2 are scored identically, the state
    that scores chunk 3 is identical, and only then do the numbers move."""
    tokens = trained[2]
    k = 3
    changed = tokens.clone()
    g = torch.Generator().manual_seed(0)
    changed[BOUNDS[k] + 1:] = torch.randint(4, 260, (tokens.numel() - BOUNDS[k] - 1,), generator=g)
    _, _, a = do_ttt(trained)
    _, _, b = do_ttt(trained, tokens=changed)
    assert scores(a)[:k] == scores(b)[:k]
    assert updates(a)[:k] == updates(b)[:k]
    assert scores(a)[k]["state"] == scores(b)[k]["state"]
    assert scores(a)[k]["loss_sum"] != scores(b)[k]["loss_sum"]
    assert updates(a)[k]["after"] != updates(b)[k]["after"]


# --- the illegal variant -------------------------------------------------------------------------

def test_train_first_variant_fails_the_audit_naming_chunk_zero(trained, tmp_path):
    model, sums, receipt = do_ttt(trained, illegal_train_first=True)
    assert len(updates(receipt)) == len(BOUNDS) - 1  # it even trains on the last chunk
    path = write_receipt(tmp_path / "illegal.json", receipt)
    with pytest.raises(AuditFailure, match=r"first offending target range \(0, 512\]"):
        audit_file(path)
    # Its chunk-0 score really is from a model that saw chunk 0.
    first = plain_chunk(fresh_model(trained), trained, 0, CHUNK)
    assert scores(receipt)[0]["loss_sum"] != first.loss_sum
    assert scores(receipt)[0]["state"] != receipt.initial_state


# --- frozen blocks and no-op adaptation ------------------------------------------------------------

def test_frozen_blocks_stay_bit_identical(trained):
    freeze = 2
    model, _, receipt = do_ttt(trained, ttt_config(freeze_blocks=freeze))
    start = fresh_model(trained)
    assert len(model.blocks) == 3
    for i, (block, ref) in enumerate(zip(model.blocks, start.blocks)):
        for (name, p), q in zip(block.named_parameters(), ref.parameters()):
            if i < freeze:
                assert torch.equal(p, q), f"blocks.{i}.{name} changed"
            elif p.ndim == 2:  # (a scalar such as q_gain may move by less than its float32 ulp)
                assert not torch.equal(p, q), f"blocks.{i}.{name} was not trained"
    assert not torch.equal(model.tok_emb.weight, start.tok_emb.weight)
    assert all(p.requires_grad for p in model.parameters())
    assert len({u["after"] for u in updates(receipt)}) == len(BOUNDS) - 2


@pytest.mark.parametrize("overrides", [{"lr": 0.0}, {"epochs": 0}])
def test_no_op_adaptation_equals_plain_sliding_evaluation_with_cuts(trained, overrides, tmp_path):
    model, sums, receipt = do_ttt(trained, ttt_config(**overrides))
    tokens, luts = trained[2], trained[3]
    start = fresh_model(trained)
    T = tokens.numel() - 1
    plain = score_windows(start, tokens, window_plan(T, SEQ_LEN, STRIDE, cuts=tuple(BOUNDS)), luts, CPU, BATCH)
    assert (sums.tokens, sums.bytes) == (plain.tokens, plain.bytes) == (T, plain.bytes)
    assert sums.loss_sum == pytest.approx(plain.loss_sum, rel=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), start.parameters()))
    # (States may still differ in bits: an lr=0 step turns -0.0 weights into +0.0.)
    assert audit_file(write_receipt(tmp_path / "noop.json", receipt)).updates == len(BOUNDS) - 2
