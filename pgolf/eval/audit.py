"""The audit of an evaluation receipt (pgolf.eval.receipt): replay its events and re-derive the
reported score, or name the first thing that does not hold. `pgolf audit` and `pgolf submit`
run it; training only writes receipts, so a shipped train_gpt.py does not carry it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pgolf.data.tokenizer import bits_per_byte
from pgolf.eval.receipt import RECEIPT_FORMAT, receipt_digest


class AuditFailure(ValueError):
    """A receipt that does not prove its reported score."""


@dataclass
class AuditReport:
    kind: str
    val_bpb: float
    val_loss: float
    scored_targets: int
    updates: int


def audit_receipt(data: dict) -> AuditReport:
    """Re-check a receipt (as loaded from JSON); raise AuditFailure naming the first problem."""
    if not isinstance(data, dict):
        raise AuditFailure(f"not a pgolf evaluation receipt (a JSON {type(data).__name__}, not an object)")
    body = {k: v for k, v in data.items() if k != "sha256"}
    if data.get("format") != RECEIPT_FORMAT:
        raise AuditFailure(f"not a pgolf evaluation receipt (format {data.get('format')!r})")
    if data.get("sha256") != receipt_digest(body):
        raise AuditFailure("receipt content does not match its sha256: it was edited after it was written")
    if data["total_targets"] <= 0:
        raise AuditFailure("the receipt scores no targets")
    if data["kind"] == "doc_lora":
        loss_sum, tokens, nbytes, updates = _replay_doc_lora(data)
        return _check_totals(data, loss_sum, tokens, nbytes, updates)
    state = data["initial_state"]
    consumed_upto = -1  # highest token index any update so far has trained on
    covered = 0  # targets 1..covered are scored
    loss_sum, tokens, nbytes, updates = 0.0, 0, 0, 0
    for i, e in enumerate(data["events"]):
        if e["type"] == "update":
            if data["kind"] != "ttt":
                raise AuditFailure(f"event {i}: a {data['kind']} evaluation must not update the model")
            if e["before"] != state:
                raise AuditFailure(f"event {i}: update starts from state {e['before']} but the model was {state}")
            state = e["after"]
            consumed_upto = max(consumed_upto, e["hi"])
            updates += 1
        elif e["type"] == "score":
            lo, hi = e["lo"], e["hi"]
            if not lo < hi <= data["total_targets"]:
                raise AuditFailure(f"event {i}: ({lo}, {hi}] is not a target range within 1..{data['total_targets']}")
            if e["state"] != state:
                raise AuditFailure(f"event {i}: targets ({lo}, {hi}] were scored by state {e['state']}, "
                                   f"which no recorded update produced (current state {state})")
            if consumed_upto > lo:
                raise AuditFailure(
                    f"event {i}: targets ({lo}, {hi}] were scored by a model already trained on tokens up to "
                    f"{consumed_upto}; first offending target range ({lo}, {min(hi, consumed_upto)}]")
            if lo != covered:
                raise AuditFailure(f"event {i}: scores targets ({lo}, {hi}] but targets up to {covered} were "
                                   f"scored so far: every target must be scored exactly once, in order")
            if e["tokens"] != hi - lo:
                raise AuditFailure(f"event {i}: range ({lo}, {hi}] has {hi - lo} targets but reports {e['tokens']}")
            covered = hi
            loss_sum += e["loss_sum"]
            tokens += e["tokens"]
            nbytes += e["bytes"]
        else:
            raise AuditFailure(f"event {i}: unknown type {e.get('type')!r}")
    if covered != data["total_targets"]:
        raise AuditFailure(f"only targets 1..{covered} of {data['total_targets']} were scored")
    return _check_totals(data, loss_sum, tokens, nbytes, updates)


def _replay_doc_lora(data: dict) -> tuple[float, int, int, int]:
    """The per-document LoRA receipt (pgolf.eval.doc_ttt): (loss_sum, tokens, bytes, updates).

    Checks: documents never overlap and together tile 1..T (each target scored exactly once);
    each document's windows read only its own tokens (from its BOS, token lo, to its last input,
    hi - 1); its chunk events are "s u s u ... s", one per chunk of chunk_tokens targets, each
    update right after the score of the chunk it trains on (scored before any update uses it);
    each batch is scored by the current base state, and its LoRA A starts fresh or where the same
    rank's previous batch left it (so it was trained only on documents scored before); a global
    phase starts from the current state and trains only on documents already scored."""
    settings, total = data["settings"], data["total_targets"]
    chunk = settings["chunk_tokens"]
    if not isinstance(chunk, int) or chunk < 1:
        raise AuditFailure(f"settings.chunk_tokens must be a positive integer, got {chunk!r}")
    state = data["initial_state"]
    scored: set[tuple[int, int]] = set()
    lora_end: dict[int, str] = {}  # rank -> its LoRA A at the end of its last batch
    after_phase: set[int] = set()  # ranks that have not scored a batch since the last phase
    loss_sum, tokens, nbytes, updates = 0.0, 0, 0, 0
    for i, e in enumerate(data["events"]):
        if e["type"] == "batch":
            rank = e["rank"]
            if e["state"] != state:
                raise AuditFailure(f"event {i}: batch {e['batch']} was scored by base state {e['state']}, which no "
                                   f"recorded phase produced (current state {state})")
            if e["lora_fresh"]:
                if rank in lora_end and rank not in after_phase:
                    raise AuditFailure(f"event {i}: rank {rank} started batch {e['batch']} with fresh LoRAs in the "
                                       "middle of a phase: LoRAs are only rebuilt after a global phase")
            elif lora_end.get(rank) != e["lora_start"]:
                raise AuditFailure(f"event {i}: batch {e['batch']} starts from LoRA A {e['lora_start']}, but rank "
                                   f"{rank}'s previous batch ended at {lora_end.get(rank)}: adapted weights of "
                                   f"unknown origin")
            lora_end[rank] = e["lora_end"]
            after_phase.discard(rank)
            for row in e["docs"]:
                lo, hi, ctx_from, ctx_to, loss, count, doc_bytes, ops = row
                where = f"event {i}: document ({lo}, {hi}]"
                if not 0 <= lo < hi <= total:
                    raise AuditFailure(f"{where} is not a target range within 1..{total}")
                if (lo, hi) in scored:
                    raise AuditFailure(f"{where} is scored twice: every target must be scored exactly once")
                if ctx_from < lo or ctx_to > hi - 1:
                    raise AuditFailure(f"{where} was scored with tokens {ctx_from}..{ctx_to}, outside its own "
                                       f"{lo}..{hi - 1}: context from another document")
                if count != hi - lo:
                    raise AuditFailure(f"{where} has {hi - lo} targets but reports {count}")
                n = -(-(hi - lo) // chunk)
                if ops != "su" * (n - 1) + "s":
                    first = next((k for k, (a, b) in enumerate(zip(ops, "su" * (n - 1) + "s")) if a != b),
                                 min(len(ops), 2 * n - 1))
                    raise AuditFailure(f"{where}: chunk events {ops[:40]!r}{'...' if len(ops) > 40 else ''} are not "
                                       f"'s u s u ... s' over its {n} chunks (first departure at event {first}): "
                                       "each chunk must be scored before the one update that trains on it")
                scored.add((lo, hi))
                loss_sum += loss
                tokens += count
                nbytes += doc_bytes
                updates += n - 1
        elif e["type"] == "phase":
            if e["before"] != state:
                raise AuditFailure(f"event {i}: global phase {e['phase']} starts from state {e['before']} but the "
                                   f"model was {state}")
            unscored = [tuple(d) for d in e["docs"] if tuple(d) not in scored]
            if unscored:
                lo, hi = unscored[0]
                raise AuditFailure(f"event {i}: global phase {e['phase']} trained on {len(unscored)} document(s) not "
                                   f"yet scored, first ({lo}, {hi}]: phases may train only on scored documents")
            state = e["after"]
            after_phase = set(lora_end)
            updates += 1
        else:
            raise AuditFailure(f"event {i}: unknown type {e.get('type')!r} in a doc_lora receipt")
    covered = 0
    for lo, hi in sorted(scored):
        if lo != covered:
            raise AuditFailure(f"targets ({covered}, {lo}] are not scored by any document" if lo > covered else
                               f"document ({lo}, {hi}] overlaps targets up to {covered}: scored twice")
        covered = hi
    if covered != total:
        raise AuditFailure(f"only targets 1..{covered} of {total} were scored")
    return loss_sum, tokens, nbytes, updates


def _check_totals(data: dict, loss_sum: float, tokens: int, nbytes: int, updates: int) -> "AuditReport":
    totals = data["totals"]
    if (totals["loss_sum"], totals["tokens"], totals["bytes"]) != (loss_sum, tokens, nbytes):
        raise AuditFailure(f"reported totals {totals['loss_sum']}, {totals['tokens']}, {totals['bytes']} differ "
                           f"from the events' sums {loss_sum}, {tokens}, {nbytes}")
    try:
        bpb = bits_per_byte(loss_sum, tokens, nbytes)
    except ValueError as exc:
        raise AuditFailure(f"the sums give no val_bpb: {exc}") from None
    if not math.isclose(totals["val_bpb"], bpb, rel_tol=1e-12):
        raise AuditFailure(f"reported val_bpb {totals['val_bpb']} differs from the sums' {bpb}")
    if not math.isclose(totals["val_loss"], loss_sum / tokens, rel_tol=1e-12):
        raise AuditFailure(f"reported val_loss {totals['val_loss']} differs from the sums' {loss_sum / tokens}")
    return AuditReport(data["kind"], bpb, loss_sum / tokens, tokens, updates)


def audit_file(path: str | Path) -> AuditReport:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError covers bad JSON and bad UTF-8
        raise AuditFailure(f"cannot read receipt {path}: {exc}") from None
    try:
        return audit_receipt(data)
    except (KeyError, TypeError) as exc:
        raise AuditFailure(f"receipt {path} is malformed: missing or wrong field {exc}") from None


# --- recomputation: `pgolf audit --rescore` ------------------------------------------------------
# A receipt proves that its numbers are consistent, not that they are the model's: a receipt whose
# sums were lowered and whose sha256 was recomputed passes audit_receipt. The rescore reloads the
# artifact, checks that it is the model the receipt says scored, and scores the receipt's target
# ranges again with the same windows, batches and float64 accumulation order.

# Loss sums that cannot be replayed bit for bit are compared within a relative tolerance:
REDUCE_REL_TOL = 1e-12  # only the order in which ranks' float64 partial sums were all-reduced differs
APPROX_REL_TOL = 1e-3  # another device type (bf16 autocast on CUDA vs fp32 on CPU) or another forward


@dataclass
class RescoreReport:
    kind: str
    val_bpb: float
    lines: list[str]  # what was recomputed, and how exactly
    exact: bool  # every loss sum compared bit for bit


def _reload_target(receipt_path: Path, artifact: str | Path | None) -> str:
    """The run directory (receipts live in <run>/receipts/) or artifact file to reload."""
    if artifact is not None:
        return str(artifact)
    from pgolf.runs import RunDir

    folder = receipt_path.resolve().parent
    if folder.name == "receipts" and RunDir(folder.parent).config.exists():
        return str(folder.parent)
    raise AuditFailure(f"receipt {receipt_path} is not in a run's receipts/ folder, so its artifact is unknown: "
                       f"pass --artifact PATH (the model.pgolf that was scored)")


def _same(a: float, b: float, rel_tol: float) -> bool:
    return a == b if rel_tol == 0 else math.isclose(a, b, rel_tol=rel_tol)


def _check_range(what: str, lo: int, hi: int, got: tuple[float, int, int], want: tuple[float, int, int],
                 rel_tol: float) -> None:
    if got[1:] != want[1:] or not _same(got[0], want[0], rel_tol):
        how = "exactly" if rel_tol == 0 else f"within relative {rel_tol:g} for the loss, exactly for the counts"
        raise AuditFailure(
            f"{what} ({lo}, {hi}] differs when rescored from the artifact: recomputed loss_sum {got[0]!r}, tokens "
            f"{got[1]}, bytes {got[2]}; the receipt says loss_sum {want[0]!r}, tokens {want[1]}, bytes {want[2]} "
            f"(compared {how}): the receipt's numbers are not this model's score")


def rescore_file(path: str | Path, artifact: str | Path | None = None, data_dir: str | None = None,
                 sample: int | None = None, device: str = "auto") -> RescoreReport:
    """Audit the receipt, then recompute its scores from the artifact; raise AuditFailure naming
    the first thing that differs. TTT receipts are replayed chunk by chunk (the first `sample`
    chunks; None: all of them)."""
    import dataclasses

    import torch

    from pgolf.eval.receipt import state_fingerprint
    from pgolf.eval.run import load_target, use_data_dir
    from pgolf.eval.ttt import TTTConfig, run_ttt
    from pgolf.eval.windows import score_windows, window_plan
    from pgolf.model.gpt import build_model
    from pgolf.model.roles import ROLE_TABLE, param_roles

    path = Path(path)
    audit = audit_file(path)  # consistency first: the rescore compares against consistent numbers only
    if sample is not None and sample < 1:
        raise ValueError(f"--sample must be at least 1 (chunks to replay), got {sample}")
    data = json.loads(path.read_text(encoding="utf-8"))
    info = data.get("info") or {}
    kind, settings, total = data["kind"], data["settings"], data["total_targets"]
    if kind == "doc_lora" and sample is not None:
        raise AuditFailure("--sample does not apply to a doc_lora receipt: its rescore replays every batch")
    if str(info.get("source", "")).startswith("live weights"):
        raise AuditFailure(f"receipt {path} scored a checkpoint's live weights ({info['source']}), not an artifact: "
                           "there is no artifact to rescore it from")
    target = _reload_target(path, artifact)
    try:
        cfg, state, _, source = load_target(target, live=False)
    except (OSError, ValueError) as exc:  # ArtifactError (corrupt file) and ConfigError are ValueErrors
        raise AuditFailure(f"cannot reload the artifact to rescore {path}: {exc}") from None
    use_data_dir(cfg, data_dir or info.get("data_dir"))

    recorded = torch.device(str(info.get("device", "cpu"))).type
    if device == "auto":
        device = "cuda" if recorded == "cuda" and torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    world = int(info.get("world_size", 1))
    lines = [f"reloaded {source}"]

    # 1. The artifact is the model that scored: the fingerprint of its weights, in the dtypes the
    #    recording device gave them (on CUDA each role's dtype), equals the receipt's initial state.
    probe = build_model(cfg.model, torch.device("cpu"))
    probe.load_state_dict(state, strict=True)
    if recorded == "cuda":
        roles = param_roles(probe)
        with torch.no_grad():
            for name, param in probe.named_parameters():
                param.data = param.data.to(ROLE_TABLE[roles[name]].cuda_dtype)
    fingerprint = state_fingerprint(probe)
    del probe
    if fingerprint != data["initial_state"]:
        raise AuditFailure(f"{source} is not the model that scored receipt {path}: its state fingerprint is "
                           f"{fingerprint}, the receipt's initial state {data['initial_state']} (pass --artifact "
                           "with the artifact that was evaluated)")
    lines.append(f"model fingerprint {fingerprint} equals the receipt's initial state")

    if kind == "doc_lora":
        return _rescore_doc_lora(data, cfg, state, dev, recorded, world, lines, audit)

    # 2. The same computation: windows per batch, device type, forward, accumulation order.
    seq_len, stride = int(settings["seq_len"]), int(settings["stride"])
    batch = info.get("batch_windows")
    approx = []  # why loss sums cannot be compared bit for bit
    if batch is None:
        batch = (cfg.train.val_batch_size // 8 // seq_len if path.name == "roundtrip.json" else 64)
        approx.append(f"the receipt does not record its batch size (written before pgolf recorded it); "
                      f"rescored with {batch} windows per batch")
    if recorded != dev.type:
        approx.append(f"scored on {recorded}, rescored on {dev.type} (different kernels and autocast)")
    if info.get("fused_loss"):
        approx.append("scored through the fused chunked loss of training, which evaluation does not replay")
    rel_tol = APPROX_REL_TOL if approx else (REDUCE_REL_TOL if world > 1 else 0.0)
    if kind == "ttt" and world > 1 and not approx:
        approx.append(f"TTT adapted with gradients all-reduced over {world} ranks; the replay runs on one")
        rel_tol = APPROX_REL_TOL

    tokens, luts, model = _replay_inputs(cfg, state, total, dev, seq_len)
    scorer = model
    if info.get("compiled") and recorded == dev.type:
        scorer = torch.compile(model, dynamic=False)
    if approx:
        lines.append("loss sums compared within relative " + f"{rel_tol:g}, not bit for bit: " + "; ".join(approx)
                     + "; token and byte counts compared exactly")
    elif world > 1:
        lines.append(f"each of the {world} ranks' shares rescored as that rank batched it; loss sums compared within "
                     f"relative {rel_tol:g} (the all-reduce order is not replayable), counts exactly")
    else:
        lines.append(f"rescored on {dev.type} with {batch} windows per batch, as recorded: compared bit for bit")

    scores = [e for e in data["events"] if e["type"] == "score"]
    if kind in ("standard", "sliding"):
        for e in scores:
            windows = window_plan(total, seq_len, stride, e["lo"], e["hi"])
            parts = [score_windows(scorer, tokens, windows, luts, dev, batch, r, world) for r in range(world)]
            loss, count, nbytes = parts[0].loss_sum, parts[0].tokens, parts[0].bytes
            for p in parts[1:]:
                loss, count, nbytes = loss + p.loss_sum, count + p.tokens, nbytes + p.bytes
            _check_range("targets", e["lo"], e["hi"], (loss, count, nbytes), (e["loss_sum"], e["tokens"], e["bytes"]),
                         rel_tol)
            lines.append(f"recomputed {kind} windows (seq_len {seq_len}, stride {stride}: {len(windows):,} windows) "
                         f"over targets ({e['lo']}, {e['hi']}]: loss_sum {loss!r}, {count:,} tokens, {nbytes:,} bytes "
                         "equal the receipt's")
        return RescoreReport(kind, audit.val_bpb, lines, not approx and world == 1)

    # TTT: replay score-first TTT with the receipt's settings; check each chunk's sums (running
    # totals, accumulated in the same order) and the state after each update.
    tcfg = TTTConfig(**{f.name: settings[f.name] for f in dataclasses.fields(TTTConfig)})
    updates = [e for e in data["events"] if e["type"] == "update"]
    replay = len(scores) if sample is None else min(sample, len(scores))
    want = [0.0, 0, 0]
    got_prev = [0.0, 0, 0]

    class _Done(Exception):
        pass

    def progress(n: int, _total: int, sums) -> None:
        e = scores[n - 1]
        want[0], want[1], want[2] = want[0] + e["loss_sum"], want[1] + e["tokens"], want[2] + e["bytes"]
        part = (sums.loss_sum - got_prev[0], sums.tokens - got_prev[1], sums.bytes - got_prev[2])
        if rel_tol == 0:  # the running totals are bit-identical exactly when every chunk is
            if (sums.loss_sum, sums.tokens, sums.bytes) != tuple(want):
                _check_range(f"TTT chunk {n} of {len(scores)}: targets", e["lo"], e["hi"], part,
                             (e["loss_sum"], e["tokens"], e["bytes"]), 0.0)
                raise AuditFailure(f"TTT chunk {n}: targets ({e['lo']}, {e['hi']}]: running loss total "
                                   f"{sums.loss_sum!r} differs from the receipt's {want[0]!r}")
            if n <= len(updates) and state_fingerprint(model) != updates[n - 1]["after"]:
                raise AuditFailure(f"TTT update {n} (tokens {updates[n - 1]['lo']}..{updates[n - 1]['hi']}) "
                                   f"replayed gives state {state_fingerprint(model)}, the receipt says "
                                   f"{updates[n - 1]['after']}")
        else:
            _check_range(f"TTT chunk {n} of {len(scores)}: targets", e["lo"], e["hi"], part,
                         (e["loss_sum"], e["tokens"], e["bytes"]), rel_tol)
        got_prev[:] = [sums.loss_sum, sums.tokens, sums.bytes]
        if n >= replay:
            raise _Done

    try:
        run_ttt(model, tokens, luts, seq_len, stride, batch, tcfg, dev, progress=progress, runner=scorer)
    except _Done:
        pass
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    done = f"replayed TTT chunks 1..{replay} of {len(scores)} (targets (0, {scores[replay - 1]['hi']}])"
    lines.append(done + (": their sums" if rel_tol else ": their sums and the state after each update")
                 + " equal the receipt's")
    if replay < len(scores):
        lines.append(f"NOT recomputed: chunks {replay + 1}..{len(scores)} (targets ({scores[replay]['lo']}, "
                     f"{total}]); run without --sample to replay every chunk")
    return RescoreReport(kind, audit.val_bpb, lines, not approx and replay == len(scores))


def _replay_inputs(cfg, state: dict, total: int, dev, seq_len: int):
    """(tokens, byte tables, model with the artifact's state) for replaying a receipt's `total`
    targets of the run's validation split."""
    from pgolf.data.shards import load_validation_tokens, validation_bytes
    from pgolf.data.tokenizer import check_vocab, load_tokenizer
    from pgolf.model.gpt import build_model

    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    check_vocab(tokenizer, cfg.model.vocab_size)
    val_tokens = load_validation_tokens(cfg.val_files(), seq_len)
    if val_tokens.numel() - 1 < total:
        raise AuditFailure(f"the validation split {cfg.val_files()} has {val_tokens.numel() - 1:,} targets but the "
                           f"receipt scored {total:,}: pass --data DIR with the split it was scored on")
    tokens = val_tokens[: total + 1]
    model = build_model(cfg.model, dev)
    model.load_state_dict({k: v.to(dev) for k, v in state.items()}, strict=True)
    return tokens, validation_bytes(cfg, tokenizer, tokens.numel(), dev), model


def _rescore_doc_lora(data: dict, cfg, state: dict, dev, recorded: str, world: int, lines: list[str],
                      audit: AuditReport) -> RescoreReport:
    """Replay per-document LoRA TTT with the receipt's settings and compare every batch (its
    documents' sums, the base state, the LoRA fingerprints) and phase with the receipt's."""
    import dataclasses

    from pgolf.eval.doc_ttt import DocTTTConfig, run_doc_ttt

    settings, total = data["settings"], data["total_targets"]
    if world > 1:
        raise AuditFailure(f"the receipt was scored by {world} ranks, each with its own chain of LoRA A matrices; "
                           "a rescore replays one process: rescore receipts of single-process evaluations")
    fields = {f.name for f in dataclasses.fields(DocTTTConfig)}
    dcfg = DocTTTConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in settings.items() if k in fields})
    tokens, luts, model = _replay_inputs(cfg, state, total, dev, 1)
    _, replay = run_doc_ttt(model, tokens, luts, dcfg, dev, bos_id=settings["bos_id"])
    rel_tol = 0.0 if recorded == dev.type else APPROX_REL_TOL
    want, got = data["events"], replay.events
    if [e["type"] for e in want] != [e["type"] for e in got]:
        raise AuditFailure("the replay's batches and phases differ from the receipt's: "
                           f"{[e['type'] for e in got]} vs {[e['type'] for e in want]}")
    for i, (w, g) in enumerate(zip(want, got)):
        if w["type"] == "phase":
            if rel_tol == 0 and w["after"] != g["after"]:
                raise AuditFailure(f"event {i}: global phase {w['phase']} replayed gives state {g['after']}, the "
                                   f"receipt says {w['after']}")
            continue
        if rel_tol == 0 and (w["state"], w["lora_end"]) != (g["state"], g["lora_end"]):
            raise AuditFailure(f"event {i}: batch {w['batch']} replayed gives base state {g['state']} and LoRA A "
                               f"{g['lora_end']}, the receipt says {w['state']} and {w['lora_end']}")
        for wr, gr in zip(w["docs"], g["docs"]):
            if wr[:2] != gr[:2]:
                raise AuditFailure(f"event {i}: batch {w['batch']} holds document ({wr[0]}, {wr[1]}], the replay "
                                   f"({gr[0]}, {gr[1]}]")
            _check_range("document", wr[0], wr[1], (gr[4], gr[5], gr[6]), (wr[4], wr[5], wr[6]), rel_tol)
    how = "bit for bit" if rel_tol == 0 else (f"within relative {rel_tol:g} (scored on {recorded}, replayed on "
                                             f"{dev.type}), counts exactly")
    lines.append(f"replayed per-document LoRA TTT over {settings['documents']} documents in {settings['batches']} "
                 f"batches: every document's sums equal the receipt's {how}"
                 + (", and so do the base and LoRA states after every batch and phase" if rel_tol == 0 else ""))
    return RescoreReport("doc_lora", audit.val_bpb, lines, rel_tol == 0)
