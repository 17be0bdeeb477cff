"""Sliding-window evaluation: the window plan's guarantees (every target once, full-length
windows, the promised context), stride == seq_len as the official evaluation, a brute-force
per-target reference, batch / rank / real 2-process invariance, and a trained model scoring
better with more context."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pgolf.eval.windows import evaluate_bpb, score_windows, window_plan
from pgolf.data.tokenizer import ByteTokenizer
from tests.eval.test_evaluate import L, V, PrefixScorer, hand_luts, tiny_gpt
from tests.gloo import run_ranks

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CPU = torch.device("cpu")
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fineweb_sp1024_sample"


def random_tokens(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n,), generator=g, dtype=torch.int64)


# --- window_plan -------------------------------------------------------------------------

PLAN_CASES = [
    (T, seq_len, stride)
    for T in (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 129)
    for seq_len in (1, 2, 3, 5, 8, 16)
    for stride in sorted({1, 2, 3, seq_len // 2 or 1, seq_len - 1 or 1, seq_len})
    if stride <= seq_len
]


def scored_targets(windows) -> list[int]:
    return [t for w in windows for t in range(w.first_scored, w.end + 1)]


def check_context(windows, seq_len: int, stride: int) -> None:
    for w in windows:
        for t in range(w.first_scored, w.end + 1):
            # target t sees tokens [start, t): t - start of them; at least seq_len - stride + 1
            # (the promised seq_len - stride and the token before the target) or all there are.
            assert t - w.start >= min(seq_len - stride + 1, t), (w, t)


@pytest.mark.parametrize("T, seq_len, stride", PLAN_CASES)
def test_window_plan_scores_every_target_once_with_full_windows(T, seq_len, stride):
    windows = window_plan(T, seq_len, stride)
    assert scored_targets(windows) == list(range(1, T + 1))  # in order, each exactly once
    assert sum(w.scored for w in windows) == T
    # The first window starts at 0 and scores all of its targets.
    assert windows[0].start == 0 and windows[0].first_scored == 1
    assert windows[0].end == min(seq_len, T)
    for w in windows:
        assert 0 <= w.start and w.end <= T  # targets (hence inputs) never run past the stream
        assert w.end - w.start == min(seq_len, T)
        assert w.start < w.first_scored <= w.end
    check_context(windows, seq_len, stride)
    # Consecutive windows advance by the stride except the last, which ends at T.
    ends = [w.end for w in windows]
    assert ends[-1] == T
    assert all(b - a == stride for a, b in zip(ends[:-2], ends[1:-1]))
    assert len(ends) == 1 or 0 < ends[-1] - ends[-2] <= stride


def test_window_plan_hand_examples():
    W = lambda s, e, f: (s, e, f)  # noqa: E731
    as_tuples = lambda ws: [(w.start, w.end, w.first_scored) for w in ws]  # noqa: E731
    assert as_tuples(window_plan(10, 4, 2)) == [W(0, 4, 1), W(2, 6, 5), W(4, 8, 7), W(6, 10, 9)]
    assert as_tuples(window_plan(11, 4, 2)) == [W(0, 4, 1), W(2, 6, 5), W(4, 8, 7), W(6, 10, 9), W(7, 11, 11)]
    assert as_tuples(window_plan(3, 8, 2)) == [W(0, 3, 1)]  # shorter stream: one short window
    assert as_tuples(window_plan(9, 4, 4)) == [W(0, 4, 1), W(4, 8, 5), W(5, 9, 9)]
    assert as_tuples(window_plan(5, 3, 1)) == [W(0, 3, 1), W(1, 4, 4), W(2, 5, 5)]
    # A cut inside the first window makes a shorter window that still starts at 0.
    assert as_tuples(window_plan(10, 4, 2, cuts=(3,))) == [W(0, 3, 1), W(0, 4, 4), W(2, 6, 5), W(4, 8, 7),
                                                           W(6, 10, 9)]
    assert as_tuples(window_plan(10, 4, 2, lo=5, hi=9)) == [W(2, 6, 6), W(4, 8, 7), W(5, 9, 9)]


@pytest.mark.parametrize("T, seq_len, stride", [c for c in PLAN_CASES if c[0] >= 7][::3])
@pytest.mark.parametrize("chunk", [1, 3, 5, 16, 40])
def test_sub_ranges_union_equals_plan_with_cuts(T, seq_len, stride, chunk):
    bounds = list(range(0, T, chunk)) + [T]
    union = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = window_plan(T, seq_len, stride, lo=lo, hi=hi)
        for w in part:  # a window never scores outside its range
            assert lo < w.first_scored <= w.end <= hi
        assert scored_targets(part) == list(range(lo + 1, hi + 1))
        union += part
    assert union == window_plan(T, seq_len, stride, cuts=tuple(bounds))
    assert scored_targets(union) == list(range(1, T + 1))
    for w in union:
        assert w.end - w.start == min(seq_len, w.end)  # full length unless the stream is shorter there
    check_context(union, seq_len, stride)
    # Cuts only add window ends: the plain plan's ends are all still there.
    assert {w.end for w in window_plan(T, seq_len, stride)} <= {w.end for w in union}


def test_window_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        window_plan(10, 4, 5)
    with pytest.raises(ValueError, match="stride"):
        window_plan(10, 4, 0)
    with pytest.raises(ValueError, match="outside"):
        window_plan(10, 4, 2, lo=5, hi=5)
    with pytest.raises(ValueError, match="outside"):
        window_plan(10, 4, 2, lo=0, hi=11)


# --- stride == seq_len is the official evaluation ------------------------------------------

def official_reference(model, tokens: torch.Tensor, luts, seq_len: int):
    """The official script's accounting: non-overlapping windows, each window's mean loss
    (float64) times its token count; bytes by the lookup-table rule in a Python loop."""
    base, lead, boundary = (t.tolist() for t in luts)
    ids = tokens.long().tolist()
    windows = (len(ids) - 1) // seq_len
    loss_sum, count, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for w in range(windows):
            x = torch.tensor(ids[w * seq_len: (w + 1) * seq_len])
            y = torch.tensor(ids[w * seq_len + 1: (w + 1) * seq_len + 1])
            logp = torch.log_softmax(model.logits(x[None])[0].double(), dim=-1)
            mean = -logp[torch.arange(seq_len), y].mean().item()
            loss_sum += mean * seq_len
            count += seq_len
            for prev, tgt in zip(x.tolist(), y.tolist()):
                nbytes += base[tgt] + (1 if lead[tgt] and not boundary[prev] else 0)
    return loss_sum, count, nbytes, loss_sum / math.log(2) / nbytes


@pytest.mark.parametrize("windows", [1, 5, 8])
def test_stride_equal_to_seq_len_is_the_official_evaluation(windows):
    model, luts = PrefixScorer(11), hand_luts(11)
    tokens = random_tokens(windows * L + 1, seed=windows)
    res = evaluate_bpb(model, tokens, luts, L, 3 * L, CPU, stride=L)
    loss_sum, count, nbytes, bpb = official_reference(model, tokens, luts, L)
    assert (res.tokens, res.bytes) == (count, nbytes) == (windows * L, nbytes)
    assert res.loss_sum == pytest.approx(loss_sum, rel=1e-9)
    assert res.val_bpb == pytest.approx(bpb, rel=1e-9)
    standard = evaluate_bpb(model, tokens, luts, L, 3 * L, CPU, stride=None)
    assert standard.to_dict() == res.to_dict()


def test_stride_equal_to_seq_len_matches_standard_for_the_gpt():
    model = tiny_gpt(12)
    luts = ByteTokenizer().byte_luts(V).to_torch("cpu")
    tokens = random_tokens(6 * L + 1, seed=12)
    for batch in (L, 4 * L):
        a = evaluate_bpb(model, tokens, luts, L, batch, CPU, stride=L)
        b = evaluate_bpb(model, tokens, luts, L, batch, CPU, stride=None)
        assert a.to_dict() == b.to_dict()
    loss_sum, count, nbytes, bpb = official_reference(model, tokens, luts, L)
    assert (a.tokens, a.bytes) == (count, nbytes)
    assert a.val_bpb == pytest.approx(bpb, rel=2e-6)  # fp32 model vs float64 log-softmax


def test_stride_equal_to_seq_len_on_a_ragged_stream_scores_the_tail_too():
    """stride=L scores all T targets (the last window overlaps); stride None only whole windows."""
    model, luts = PrefixScorer(13), hand_luts(13)
    tokens = random_tokens(4 * L + 1 + 5, seed=13)
    sliding = evaluate_bpb(model, tokens, luts, L, 2 * L, CPU, stride=L)
    standard = evaluate_bpb(model, tokens, luts, L, 2 * L, CPU, stride=None)
    assert standard.tokens == 4 * L and sliding.tokens == 4 * L + 5
    head = evaluate_bpb(model, tokens[: 4 * L + 1], luts, L, 2 * L, CPU, stride=None)
    assert head.to_dict() == standard.to_dict()
    tail = brute_force(model, tokens, luts, L, L)[4 * L + 1:]
    assert sliding.loss_sum == pytest.approx(standard.loss_sum + sum(x[0] for x in tail), rel=1e-12)


# --- brute force: every target from exactly its own window ---------------------------------

def brute_force(model, tokens: torch.Tensor, luts, seq_len: int, stride: int, cuts=()):
    """Per target t (index t; entry 0 unused): (nats, bytes), from the docstring's rule alone.

    Windows end at min(seq_len, T), then every `stride`, at T and at every cut; target t is
    scored by the first window ending at or after t, whose inputs are tokens[max(end-seq_len,0):end]."""
    ids = tokens.long()
    T = ids.numel() - 1
    ends, e = set(), min(seq_len, T)
    while e < T:
        ends.add(e)
        e += stride
    ends.add(T)
    ends.update(c for c in cuts if 0 < c < T)
    ends = sorted(ends)
    base, lead, boundary = (t.tolist() for t in luts)
    out = [None] * (T + 1)
    cache = {}
    with torch.no_grad():
        for t in range(1, T + 1):
            end = next(x for x in ends if x >= t)
            start = max(end - seq_len, 0)
            if end not in cache:
                cache[end] = torch.log_softmax(model.logits(ids[start:end][None])[0].double(), dim=-1)
            logp = cache[end]
            prev, tgt = int(ids[t - 1]), int(ids[t])
            out[t] = (-logp[t - start - 1, tgt].item(), base[tgt] + (1 if lead[tgt] and not boundary[prev] else 0))
    return out


def brute_sums(per_target, lo: int = 0, hi: int | None = None):
    hi = len(per_target) - 1 if hi is None else hi
    sel = per_target[lo + 1: hi + 1]
    return sum(x[0] for x in sel), len(sel), sum(x[1] for x in sel)


@pytest.mark.parametrize("n_tokens, stride", [(8 * L + 1, L // 4), (7 * L + 6, 5), (50, 1), (L - 3, 4),
                                              (3 * L + 2, L - 1)])
def test_score_windows_matches_brute_force_float64(n_tokens, stride):
    model, luts = PrefixScorer(21), hand_luts(21)
    tokens = random_tokens(n_tokens, seed=n_tokens)
    T = n_tokens - 1
    sums = score_windows(model, tokens, window_plan(T, L, stride), luts, CPU, batch_windows=4)
    loss, count, nbytes = brute_sums(brute_force(model, tokens, luts, L, stride))
    assert (sums.tokens, sums.bytes) == (count, nbytes) == (T, nbytes)
    assert sums.loss_sum == pytest.approx(loss, rel=1e-12)
    res = evaluate_bpb(model, tokens, luts, L, 4 * L, CPU, stride=stride)
    assert res.loss_sum == pytest.approx(loss, rel=1e-12) and (res.tokens, res.bytes) == (count, nbytes)


def test_score_windows_matches_brute_force_with_cuts_and_sub_ranges():
    model, luts = PrefixScorer(22), hand_luts(22)
    tokens = random_tokens(9 * L + 4, seed=22)
    T, stride, chunk = tokens.numel() - 1, 6, 23
    bounds = list(range(0, T, chunk)) + [T]
    ref = brute_force(model, tokens, luts, L, stride, cuts=bounds)
    whole = score_windows(model, tokens, window_plan(T, L, stride, cuts=tuple(bounds)), luts, CPU, 5)
    loss, count, nbytes = brute_sums(ref)
    assert (whole.tokens, whole.bytes) == (count, nbytes)
    assert whole.loss_sum == pytest.approx(loss, rel=1e-12)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = score_windows(model, tokens, window_plan(T, L, stride, lo, hi), luts, CPU, 2)
        loss, count, nbytes = brute_sums(ref, lo, hi)
        assert (part.tokens, part.bytes) == (count, nbytes) == (hi - lo, nbytes)
        assert part.loss_sum == pytest.approx(loss, rel=1e-12)
    # The cuts really change what is scored (shorter context right after a cut).
    plain = brute_sums(brute_force(model, tokens, luts, L, stride))
    assert plain[0] != pytest.approx(brute_sums(ref)[0], rel=1e-12)


def test_score_windows_matches_brute_force_gpt():
    model = tiny_gpt(23)
    luts = ByteTokenizer().byte_luts(V).to_torch("cpu")
    tokens = random_tokens(6 * L + 3, seed=23)
    T, stride = tokens.numel() - 1, 3
    sums = score_windows(model, tokens, window_plan(T, L, stride), luts, CPU, 8)
    loss, count, nbytes = brute_sums(brute_force(model, tokens, luts, L, stride))
    assert (sums.tokens, sums.bytes) == (count, nbytes)
    assert sums.loss_sum == pytest.approx(loss, rel=2e-6)
    standard = evaluate_bpb(model, tokens, luts, L, 8 * L, CPU)
    assert abs(sums.loss_sum / T - standard.val_loss) > 1e-4  # sliding really scores differently


# --- batch and rank invariance ----------------------------------------------------------

@pytest.mark.parametrize("model_kind", ["scorer", "gpt"])
def test_batch_size_and_rank_split_do_not_change_sliding_sums(model_kind):
    model = PrefixScorer(31) if model_kind == "scorer" else tiny_gpt(31)
    luts = hand_luts(31)
    tokens = random_tokens(7 * L + 6, seed=31)
    T = tokens.numel() - 1
    windows = window_plan(T, L, 5, cuts=(20, 57))
    n = len(windows)
    tol = 1e-12 if model_kind == "scorer" else 1e-6
    results = [score_windows(model, tokens, windows, luts, CPU, b) for b in (1, 3, n)]
    for r in results[1:]:
        assert (r.tokens, r.bytes) == (results[0].tokens, results[0].bytes) == (T, r.bytes)
        assert r.loss_sum == pytest.approx(results[0].loss_sum, rel=tol)
    single = results[0]
    for world in (2, 3, n + 1):  # more ranks than windows: some ranks score nothing
        shards = [score_windows(model, tokens, windows, luts, CPU, 2, rank=r, world_size=world) for r in range(world)]
        assert sum(s.tokens for s in shards) == single.tokens
        assert sum(s.bytes for s in shards) == single.bytes
        assert sum(s.loss_sum for s in shards) == pytest.approx(single.loss_sum, rel=tol)
        assert sum(s.tokens == 0 for s in shards) == max(world - n, 0)  # the work really is split
        assert max(s.tokens for s in shards) < single.tokens


# --- a real 2-process run (gloo) ----------------------------------------------------------

def _sums_on_ranks(rank: int, world_size: int) -> dict:
    out = {}
    for kind, model, batch in (("scorer", PrefixScorer(41), 3), ("gpt", tiny_gpt(41), 1)):
        tokens = random_tokens(9 * L + 4, seed=41)
        windows = window_plan(tokens.numel() - 1, L, 5, cuts=(33,))
        s = score_windows(model, tokens, windows, hand_luts(41), CPU, batch, rank=rank, world_size=world_size)
        out[kind] = [s.loss_sum, s.tokens, s.bytes]
    return out


def test_two_gloo_processes_all_reduce_to_the_single_process_sums(tmp_path):
    outs = run_ranks(_sums_on_ranks, tmp_path)
    assert outs[0] == outs[1]  # every rank holds the all-reduced totals
    for kind, model, batch in (("scorer", PrefixScorer(41), 3), ("gpt", tiny_gpt(41), 1)):
        tokens = random_tokens(9 * L + 4, seed=41)
        windows = window_plan(tokens.numel() - 1, L, 5, cuts=(33,))
        single = score_windows(model, tokens, windows, hand_luts(41), CPU, batch)
        half = score_windows(model, tokens, windows, hand_luts(41), CPU, batch, rank=0, world_size=2)
        loss_sum, count, nbytes = outs[0][kind]
        assert (count, nbytes) == (single.tokens, single.bytes) == (tokens.numel() - 1, single.bytes)
        assert loss_sum == pytest.approx(single.loss_sum, rel=1e-9)
        assert half.tokens < count  # so the all-reduce really added the other rank's share


# --- more context helps a trained model ------------------------------------------------------

@pytest.mark.skipif(not SHARED.is_dir(), reason="shared FineWeb sample not present")
def test_sliding_beats_standard_on_a_model_trained_on_fineweb(tmp_path):
    from pgolf.config.resolve import resolve_config
    from pgolf.data.shards import load_validation_tokens
    from pgolf.eval.run import load_target
    from pgolf.model.gpt import build_model
    from pgolf.data.tokenizer import load_tokenizer
    from pgolf.train.run import run_training

    # One wide attention layer learns to use its context within 100 steps (a bag-of-words
    # "topic" signal); the default 1200-step warmdown would keep the learning rate tiny.
    cfg, _ = resolve_config(None, [
        f"data.data_path={SHARED}", f"data.tokenizer_path={SHARED}/fineweb_1024_bpe.model", "model.vocab_size=1024",
        f"run.runs_dir={tmp_path}", "run.run_id=fw", "model.num_layers=1", "model.model_dim=128",
        "model.num_heads=4", "model.num_kv_heads=2", "train.train_batch_tokens=1024", "train.train_seq_len=32",
        "train.val_batch_size=8192", "train.max_wallclock_seconds=0", "train.warmup_steps=0", "train.iterations=100",
        "train.warmdown_iters=30", "train.val_loss_every=0", "train.train_log_every=0", "train.val_max_tokens=4096"],
        env={})
    summary = run_training(cfg, console=False)
    assert summary["status"] == "done"
    cfg, state, _, _ = load_target(str(tmp_path / "fw"), live=False)  # the artifact, as the roundtrip scored it
    model = build_model(cfg.model, CPU)
    model.load_state_dict(state)
    luts = load_tokenizer(cfg.data.tokenizer_path).byte_luts(1024).to_torch("cpu")
    tokens = load_validation_tokens(cfg.val_files(), 32)
    # The summary's roundtrip is the standard evaluation of the first 4096 targets.
    head = evaluate_bpb(model, tokens[:4097], luts, 32, 8192 // 8, CPU)
    assert head.to_dict() == summary["roundtrip"]
    for seq_len in (32, 16):
        val = tokens[: 8192 + 1]
        standard = evaluate_bpb(model, val, luts, seq_len, 64 * seq_len, CPU)
        sliding = evaluate_bpb(model, val, luts, seq_len, 64 * seq_len, CPU, stride=seq_len // 4)
        assert (sliding.tokens, sliding.bytes) == (standard.tokens, standard.bytes) == (8192, standard.bytes)
        assert standard.val_loss < 0.85 * math.log(1024)  # it learned something
        assert sliding.val_bpb < standard.val_bpb - 0.002, (seq_len, sliding.val_bpb, standard.val_bpb)
