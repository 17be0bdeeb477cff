"""Legality probes of an evaluation, run on the model itself (issue #1017's C1 and C2).

C1, strict causal dependence: the distribution at position t is a function of the tokens before
t only. `causal_probe` takes windows exactly as the evaluation plans them (pgolf.eval.windows),
scores each with the evaluation's own forward, then changes the tokens from a cut onward (one
token, the whole rest of the window, or a document boundary inserted or removed) and requires
every distribution before the cut, and every loss whose target did not change, to be the same
bit for bit. Cuts are sampled inside the scored targets, at the last target, and around a BOS, so
a leak across documents (a SmearGate mixing the next document in) is caught like any other.
`ttt_state_probe` does the same for score-first TTT at the level of chunks: the state that
scores chunk k, and every score and update before it, must not depend on any token from chunk
k's first target onward.

C2, a normalized distribution: `normalization_probe` reads the model's distribution over the
whole vocabulary at every position of the sampled windows (its `log_probs(x)` if it has one,
else log_softmax of `logits(x)`), requires it to cover the tokenizer's vocabulary and to sum to
1 (logsumexp 0), and requires the loss the evaluation scores to be -log p[target] read from it.

Every probe takes the model as an argument, so a deliberately broken one (peeking one token
ahead, unnormalized scores, adapting before scoring) can be handed in and shown to be caught.
Nothing here is shipped: training never imports it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pgolf.eval.windows import Window, autocast_for, window_plan

# Loss and log-probabilities compared by C2: they come from the same logits by two routes
# (cross_entropy and log_softmax), equal up to float rounding.
NORMALIZATION_TOL = 1e-4


@dataclass
class ProbeResult:
    ok: bool
    detail: str  # what was checked, or the first violation
    checks: int = 0  # comparisons made
    notes: list[str] = field(default_factory=list)


# --- windows as the evaluation plans them ------------------------------------------------------

def sample_windows(tokens: Tensor, seq_len: int, stride: int, bos_id: int | None, count: int = 3,
                   seed: int = 0) -> list[Window]:
    """Windows of the evaluation's plan over `tokens` (targets 1..T): the first, one that holds a
    document boundary (BOS) near its middle when the stream has one, and random ones, up to
    `count`. Each is the window window_plan gives for its schedule step, first_scored included."""
    total = tokens.numel() - 1
    first_end = min(seq_len, total)
    steps = (total - first_end) // stride  # window ends: first_end + k * stride, k = 0..steps (then total)

    def at(k: int) -> Window:
        end = min(first_end + k * stride, total)
        lo = 0 if k == 0 else first_end + (k - 1) * stride
        return window_plan(total, seq_len, stride, lo, end)[-1]

    chosen = [0]
    if bos_id is not None and steps > 0:
        bos = torch.nonzero(tokens[seq_len // 2 + 1:] == bos_id)
        if bos.numel():  # the first BOS past half a window: put it near the middle of a window
            b = int(bos[0]) + seq_len // 2 + 1
            k = min(max(0, -(-(b + seq_len // 2 - first_end) // stride)), steps)
            chosen.append(k)
    rng = random.Random(seed)
    while len(set(chosen)) < min(count, steps + 1):
        chosen.append(rng.randint(1, steps))
    return [at(k) for k in dict.fromkeys(chosen)][:count]


def _forward(model: nn.Module, seq: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """(log-distribution (n, V) float64, per-target loss (n,) float64) of one window, through
    the evaluation's forward (model(x, y, reduction="none") under its autocast)."""
    seq = seq.to(device=device, dtype=torch.int64)[None]
    x, y = seq[:, :-1], seq[:, 1:]
    with torch.no_grad(), autocast_for(device):
        logp = log_distribution(model, x)[0].double()
        loss = model(x, y, reduction="none").reshape(-1).double()
    return logp, loss


def log_distribution(model: nn.Module, x: Tensor) -> Tensor:
    """The model's distribution over the vocabulary, as log-probabilities (batch, seq, V): its own
    `log_probs(x)` when it defines one, else log_softmax of its `logits(x)`."""
    if hasattr(model, "log_probs"):
        return model.log_probs(x).float()
    return torch.log_softmax(model.logits(x).float(), dim=-1)


# --- C1 ----------------------------------------------------------------------------------------

PERTURBATIONS = ("next token", "rest of window", "document boundary")


def _cuts(window: Window, seq: Tensor, bos_id: int | None, rng: random.Random) -> list[tuple[int, str]]:
    """Cut points c (1..n, an index into the window's tokens: tokens c.. change) with why."""
    n = seq.numel() - 1
    first = window.first_scored - window.start  # index of the first scored target in seq
    cuts = {n: "the last target", first: "the first scored target"}
    if n - first > 1:
        cuts.setdefault(rng.randint(first + 1, n - 1), "a sampled target")
    if bos_id is not None:
        for j in torch.nonzero(seq[1:] == bos_id).flatten().tolist():
            j += 1  # seq[j] is a BOS
            cuts.setdefault(j, "a BOS (the document boundary itself)")
            if j + 1 <= n:
                cuts.setdefault(j + 1, "the first token of the next document")
            break
    return sorted(cuts.items())


def _perturbed(seq: Tensor, c: int, kind: str, bos_id: int | None, vocab: int, gen: torch.Generator) -> Tensor:
    out = seq.clone()
    if kind == "next token":
        out[c] = (seq[c] + 1 + torch.randint(0, vocab - 1, (), generator=gen)) % vocab  # any other token
    elif kind == "rest of window":
        out[c:] = torch.randint(0, vocab, (seq.numel() - c,), generator=gen)
        out[c] = (seq[c] + 1 + torch.randint(0, vocab - 1, (), generator=gen)) % vocab
    else:  # a document boundary inserted at c, or the one at c removed
        if bos_id is None:
            return _perturbed(seq, c, "next token", bos_id, vocab, gen)
        out[c] = bos_id if int(seq[c]) != bos_id else (bos_id + 1) % vocab
    return out


def causal_probe(model: nn.Module, tokens: Tensor, windows: list[Window], vocab_size: int,
                 device: torch.device = torch.device("cpu"), bos_id: int | None = None, seed: int = 0,
                 atol: float = 0.0) -> ProbeResult:
    """C1 on the given windows of `tokens` (global target indices, as the evaluation plans them).
    For each cut c and perturbation, the distributions at every position before c and the losses
    of every target before c must equal the unperturbed window's (within atol; 0: bit for bit)."""
    was_training = model.training
    model.eval()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    checks, boundaries = 0, 0
    try:
        for w in windows:
            seq = tokens[w.start: w.end + 1].long().cpu()
            ref_logp, ref_loss = _forward(model, seq, device)
            for c, why in _cuts(w, seq, bos_id, rng):
                for kind in PERTURBATIONS:
                    changed = _perturbed(seq, c, kind, bos_id, vocab_size, gen)
                    logp, loss = _forward(model, changed, device)
                    checks += 1
                    boundaries += kind == "document boundary" or "BOS" in why or "next document" in why
                    # Position i predicts seq[i + 1]: positions 0..c-1 see only unchanged tokens, and
                    # the targets of positions 0..c-2 are unchanged too.
                    dist_diff = (logp[:c] - ref_logp[:c]).abs().amax(dim=-1)
                    loss_diff = (loss[: c - 1] - ref_loss[: c - 1]).abs()
                    bad = torch.nonzero(dist_diff > atol).flatten()
                    bad_loss = torch.nonzero(loss_diff > atol).flatten()
                    if bad.numel() or bad_loss.numel():
                        g = w.start + c  # the first changed token, as a stream index
                        if bad.numel():
                            i = int(bad[0])
                            what = (f"the distribution at position {w.start + i} (predicting token {w.start + i + 1}) "
                                    f"changed by up to {float(dist_diff[i]):.3g} in log-probability")
                        else:
                            i = int(bad_loss[0])
                            what = (f"the scored loss of token {w.start + i + 1} changed by {float(loss_diff[i]):.3g} "
                                    "nats (its distribution did not: the score reads something else)")
                        return ProbeResult(False, f"window of tokens [{w.start}, {w.end}]: changing the {kind} from "
                                                  f"token {g} ({why}) changed an earlier score: {what}; the model "
                                                  f"sees tokens after the one it predicts", checks)
    finally:
        model.train(was_training)
    exact = "bit for bit" if atol == 0 else f"within {atol:g}"
    return ProbeResult(True, f"{len(windows)} windows, {checks} perturbations ({boundaries} at document boundaries): "
                             f"every earlier distribution and score unchanged, {exact}", checks)


# --- C2 ----------------------------------------------------------------------------------------

def normalization_probe(model: nn.Module, tokens: Tensor, windows: list[Window], vocab_size: int,
                        device: torch.device = torch.device("cpu"), tol: float = NORMALIZATION_TOL) -> ProbeResult:
    """C2 at every position of the given windows: a distribution over all `vocab_size` tokens that
    sums to 1, and the scored loss equal to -log p[target] read from it."""
    was_training = model.training
    model.eval()
    positions, worst_sum, worst_read = 0, 0.0, 0.0
    try:
        for w in windows:
            seq = tokens[w.start: w.end + 1].long().cpu()
            logp, loss = _forward(model, seq, device)
            if logp.shape[-1] != vocab_size:
                return ProbeResult(False, f"the distribution has {logp.shape[-1]} entries but the vocabulary has "
                                          f"{vocab_size} tokens: it must cover every token of the alphabet", positions)
            if not torch.isfinite(logp.nan_to_num(neginf=0.0)).all() or not torch.isfinite(loss).all():
                return ProbeResult(False, f"window of tokens [{w.start}, {w.end}]: the distribution or the scored loss "
                                          "is not finite (NaN or +inf)", positions)
            lse = torch.logsumexp(logp, dim=-1).abs()
            targets = seq[1:].to(logp.device)
            read = (loss + logp.gather(1, targets[:, None]).squeeze(1)).abs()
            positions += seq.numel() - 1
            worst_sum, worst_read = max(worst_sum, float(lse.max())), max(worst_read, float(read.max()))
            if float(lse.max()) > tol:
                i = int(lse.argmax())
                total = float(torch.exp(torch.logsumexp(logp[i], dim=-1)))
                return ProbeResult(False, f"position {w.start + i}: the distribution sums to {total:.6g}, not 1 (over "
                                          f"all {vocab_size} tokens): the score is not a normalized probability",
                                   positions)
            if float(read.max()) > tol:
                i = int(read.argmax())
                return ProbeResult(False, f"position {w.start + i}: the scored loss is {float(loss[i]):.6g} nats but "
                                          f"the model's normalized distribution gives -log p[target] = "
                                          f"{float(-logp[i, targets[i]]):.6g}: the scored probability is not read "
                                          "from that distribution", positions)
    finally:
        model.train(was_training)
    return ProbeResult(True, f"{positions:,} positions in {len(windows)} windows: the distribution covers all "
                             f"{vocab_size} tokens and sums to 1 (|logsumexp| <= {worst_sum:.1e}); each scored loss is "
                             f"-log p[target] from it (within {worst_read:.1e})", positions)


# --- C1 for score-first TTT ------------------------------------------------------------------------

def ttt_state_probe(make_model, tokens: Tensor, luts, vocab_size: int, seq_len: int, stride: int, batch_windows: int,
                    tcfg, device: torch.device = torch.device("cpu"), runner=None, seed: int = 0) -> ProbeResult:
    """Score-first TTT over `tokens` (a few chunks of tcfg.chunk_tokens), then again with every
    token from chunk k's first target onward replaced, for each chunk k: the scores and updates of
    chunks before k, and the state that scores chunk k, must be bit-identical; chunk 0 must be
    scored by the initial state. make_model() returns a fresh copy of the model; runner has
    pgolf.eval.ttt.run_ttt's signature (the default)."""
    if runner is None:
        from pgolf.eval.ttt import run_ttt as runner
    gen = torch.Generator().manual_seed(seed)

    def run(toks: Tensor):
        model = make_model()
        _, receipt = runner(model, toks, luts, seq_len, stride, batch_windows, tcfg, device)
        scores = [e for e in receipt.events if e["type"] == "score"]
        updates = [e for e in receipt.events if e["type"] == "update"]
        return receipt, scores, updates

    base, scores, updates = run(tokens)
    if scores[0]["state"] != base.initial_state:
        return ProbeResult(False, f"chunk 0 (targets (0, {scores[0]['hi']}]) was scored by state {scores[0]['state']}, "
                                  f"not the initial state {base.initial_state}: the model was updated before its first "
                                  "score", 0)
    checks = 0
    for k in range(1, len(scores)):
        lo = scores[k]["lo"]
        changed = tokens.clone()
        changed[lo + 1:] = torch.randint(0, vocab_size, (tokens.numel() - lo - 1,), generator=gen)
        _, other, other_updates = run(changed)
        checks += 1
        for j in range(k):
            if other[j] != scores[j]:
                return ProbeResult(False, f"changing the tokens from {lo + 1} on (chunk {k} onward) changed the "
                                          f"score of chunk {j} (targets ({scores[j]['lo']}, {scores[j]['hi']}]): it "
                                          "depends on later tokens", checks)
        if other_updates[:k] != updates[:k]:
            return ProbeResult(False, f"changing the tokens from {lo + 1} on changed an update made before chunk {k} "
                                      "was scored: it trained on tokens not yet scored", checks)
        if other[k]["state"] != scores[k]["state"]:
            return ProbeResult(False, f"the state that scores chunk {k} (targets ({lo}, {scores[k]['hi']}]) changed "
                                      f"when tokens from {lo + 1} on changed ({scores[k]['state']} vs "
                                      f"{other[k]['state']}): the model adapted on tokens before scoring them", checks)
    return ProbeResult(True, f"TTT over {len(scores)} chunks of {tcfg.chunk_tokens} tokens, re-run {checks} times with "
                             "every token from a chunk's first target on replaced: earlier scores, earlier updates and "
                             "the state scoring that chunk bit-identical; chunk 0 scored by the initial state", checks)
