"""`pgolf check RUN_DIR | SUBMISSION_DIR`: the challenge's legality questions, machine-verified.

One row per check, PASS / FAIL / SKIP with the reason; exit 0 only when nothing fails:

  C1 causal       per evaluation mode the run was scored with (standard, sliding, TTT): on the run's
                  model, reloaded from its artifact as `pgolf eval` does, no earlier score changes
                  when later tokens do (pgolf.eval.probes.causal_probe); for TTT also the state that
                  scores each chunk (ttt_state_probe)
  C2 normalized   the distribution sums to 1 over the whole vocabulary and the scored probability is
                  read from it (normalization_probe)
  C3 score-first  every receipt passes `pgolf audit`; a finished run has its roundtrip receipt
  C4 single pass  which evaluation counts for each reported number (pgolf.lab.evaluations), and that
                  the summary, the log and the ledger report that one
  bytes           each receipt's byte counts equal the UTF-8 length of the decoded validation text
                  (pgolf.data.text_bytes), and the sidecar total where the data set states one
  provenance      no validation document in any training shard (pgolf.data.provenance)
  val split       the validation split has the document count of its named dataset variant
  train budget    training data read only inside the training budget (the export's calibration)
  eval data       evaluation reads no training data: `pgolf eval` traced on a prefix
  artifact        artifact + code <= 16,000,000 bytes, recomputed from the files; the train_gpt.py
                  built now is the code the run counted

A check that lacks what it needs (no receipts, no shards on this machine, a run older than the
record it reads) is SKIP with the reason, never a silent PASS. A records folder (from `pgolf
submit`) gets the checks its files allow, and each seed's run directory, when found under
--runs-dir, the run checks (pgolf.lab.check_submission). `pgolf submit` runs check_run on every
seed and refuses on any FAIL. What the checks read from a run is pgolf.lab.check_context; the
command line is pgolf.lab.check_cli.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import re
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pgolf.lab.check_context import CheckOptions, Mode, RunContext, Skip
from pgolf.lab.evaluations import EXTRA_KINDS, ROUNDTRIP, not_of_the_split
from pgolf.rules import SIZE_CAP_BYTES
from pgolf.runs import RunDir

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
# Row keys, in the order the rows print (--skip takes them).
KEYS = ("c1", "c2", "c3", "c4", "bytes", "provenance", "val-split", "train-budget", "eval-data", "artifact")
TTT_PROBE_SEQ = 256  # the TTT state probe's window length at most (3 chunks of 2 windows: seconds on CPU)
FINAL_LINE = re.compile(r"^final_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)\s*$", re.MULTILINE)
MODEL_BYTES_LINE = re.compile(r"^artifact model bytes: ([\d,]+)\s*$", re.MULTILINE)
CODE_BYTES_LINE = re.compile(r"^code bytes: ([\d,]+) \((.*)\)\s*$", re.MULTILINE)
SHA = re.compile(r"sha256:([0-9a-f]{16})")  # the code digest in a code description


@dataclass
class Row:
    key: str
    check: str
    status: str
    detail: str
    target: str = ""  # the seed, in a records folder's rows

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- the run checks ----------------------------------------------------------------------------

def check_causal(ctx: RunContext, mode: Mode) -> tuple[str, str]:
    from pgolf.eval.probes import causal_probe, sample_windows, ttt_state_probe

    tokens = ctx.val_prefix(mode.seq_len)
    vocab = ctx.cfg.model.vocab_size
    windows = sample_windows(tokens, mode.seq_len, mode.stride, ctx.bos_id, ctx.opts.windows, ctx.opts.seed)
    result = causal_probe(ctx.model, tokens, windows, vocab, ctx.device, ctx.bos_id, ctx.opts.seed)
    if not result.ok or mode.kind != "ttt":
        return (PASS if result.ok else FAIL), result.detail
    from pgolf.eval.ttt import TTTConfig

    s = mode.ttt or {}
    seq_len = min(mode.seq_len, TTT_PROBE_SEQ)
    stride = min(mode.stride, seq_len)
    given = {f.name: s[f.name] for f in dataclasses.fields(TTTConfig) if f.name in s}
    tcfg = TTTConfig(**{**given, "chunk_tokens": 2 * seq_len})
    luts = ctx.tokenizer.byte_luts(vocab).to_torch(ctx.device)
    base = ctx.model
    state = ttt_state_probe(lambda: copy.deepcopy(base), tokens[: 3 * tcfg.chunk_tokens + 1], luts, vocab, seq_len,
                            stride, 64, tcfg, ctx.device, runner=ctx.opts.ttt_runner, seed=ctx.opts.seed)
    detail = f"{result.detail}; {state.detail} (the {mode.source} settings, seq_len {seq_len})"
    return (PASS if state.ok else FAIL), detail


def check_normalized(ctx: RunContext) -> tuple[str, str]:
    from pgolf.eval.probes import normalization_probe, sample_windows

    mode = ctx.modes[0]
    tokens = ctx.val_prefix(mode.seq_len)
    windows = sample_windows(tokens, mode.seq_len, mode.stride, ctx.bos_id, ctx.opts.windows, ctx.opts.seed)
    result = normalization_probe(ctx.model, tokens, windows, ctx.cfg.model.vocab_size, ctx.device)
    return (PASS if result.ok else FAIL), result.detail


def check_score_first(ctx: RunContext) -> tuple[str, str]:
    from pgolf.eval.audit import AuditFailure, audit_file

    if not ctx.receipts:
        raise Skip("no receipts in receipts/: the run predates them or did not reach its roundtrip; its scores "
                   "cannot be audited")
    parts = []
    for name in sorted(ctx.receipts, key=lambda n: n != ROUNDTRIP):
        try:
            report = audit_file(ctx.rd.receipts / name)
        except AuditFailure as exc:
            return FAIL, f"receipts/{name}: {exc}"
        parts.append(f"{name} ({report.kind}" + (f", {report.updates} updates" if report.updates else "") + ")")
    if ctx.finished and ROUNDTRIP not in ctx.receipts:
        return FAIL, f"receipts/{ROUNDTRIP} is missing: the run's roundtrip score has no receipt"
    return PASS, (f"{len(parts)} receipts pass `pgolf audit`: {', '.join(parts)}; every target scored exactly once, "
                  "none by a state that had trained on it or on any later token")


def _ledger_row(run_dir: Path) -> dict | None:
    from pgolf.lab.ledger import LEDGER_NAME, Ledger

    if not (run_dir.parent / LEDGER_NAME).exists():
        return None
    try:
        return Ledger(run_dir.parent).get(run_dir.name)
    except sqlite3.Error:
        return None


def _same(a, b) -> bool:
    return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-12)


def check_single_pass(ctx: RunContext) -> tuple[str, str]:
    if not ctx.receipts:
        raise Skip("no receipts: which evaluation a score came from cannot be told")
    counted = ctx.counted
    rt = ctx.summary.get("roundtrip") or {}
    parts = []
    if ctx.finished:
        if "roundtrip" not in counted:
            return FAIL, f"the summary reports a roundtrip score but receipts/{ROUNDTRIP} is missing"
        totals = counted["roundtrip"].data.get("totals") or {}
        if not (_same(rt.get("val_bpb"), totals.get("val_bpb")) and _same(rt.get("val_loss"), totals.get("val_loss"))):
            return FAIL, (f"summary.json reports val_bpb {rt.get('val_bpb')}, but the evaluation that counts, "
                          f"receipts/{ROUNDTRIP}, scored {totals.get('val_bpb')}")
        final = None
        for final in FINAL_LINE.finditer(ctx.log):
            pass
        if final is not None and (final[1], final[2]) != (f"{rt['val_loss']:.8f}", f"{rt['val_bpb']:.8f}"):
            return FAIL, f"train.log's last line ({final[0].strip()}) is not the roundtrip score summary.json reports"
    for kind, c in counted.items():
        what = f"{kind}: {c.name}"
        if c.data.get("totals"):
            what += f" counts (val_bpb {c.data['totals']['val_bpb']:.8f})"
        if c.others:
            what += (f", the {'roundtrip' if kind == 'roundtrip' else 'latest'} of {len(c.others) + 1} evaluations of "
                     f"the split; not counted: {', '.join(c.others)}")
        parts.append(what)
    row = _ledger_row(ctx.dir)
    for kind in EXTRA_KINDS:
        reported = (row or {}).get(f"{kind}_val_bpb")
        if reported is None:
            continue
        if kind not in counted:
            return FAIL, (f"the ledger reports a {kind} val_bpb of {reported} but the run holds no {kind} receipt of "
                          "its split: the number has no evaluation behind it here")
        if not _same(reported, counted[kind].data["totals"]["val_bpb"]):
            return FAIL, (f"the ledger reports {kind} val_bpb {reported}, but the evaluation that counts "
                          f"({counted[kind].name}) scored {counted[kind].data['totals']['val_bpb']}: the reported "
                          "number comes from another evaluation")
    ignored = not_of_the_split(ctx.receipts, ctx.scored_targets)
    if ignored:
        parts.append(f"not evaluations of the split (prefix, live weights or other data), never counted: "
                     f"{', '.join(ignored)}")
    return PASS, "; ".join(parts) + ("; the summary, train.log and ledger report these" if ctx.finished else "")


def _scored_ranges(events: list[dict]):
    """(lo, hi, bytes) of every scored target range (lo, hi] a receipt states: its score events,
    and each document of a per-document TTT batch (pgolf.eval.doc_ttt: row lo, hi, ..., bytes at 6)."""
    for e in events:
        if e.get("type") == "score":
            yield int(e["lo"]), int(e["hi"]), int(e["bytes"])
        elif e.get("type") == "batch":
            yield from ((int(d[0]), int(d[1]), int(d[6])) for d in e["docs"])


def check_bytes(ctx: RunContext) -> tuple[str, str]:
    import numpy as np

    from pgolf.data.shards import load_byte_sidecar
    from pgolf.data.text_bytes import TextBytes, sidecar_val_bytes

    if not ctx.receipts:
        raise Skip("no receipts: no evaluation's byte counts to recount")
    val = ctx.val_tokens
    counter = TextBytes(val, ctx.tokenizer)
    sidecar = None if ctx.cfg.data.byte_sidecar == "off" else load_byte_sidecar(ctx.val_files, len(val))
    cumulative = None if sidecar is None else np.concatenate([[0], np.cumsum(sidecar.numpy()[1:], dtype=np.int64)])
    source = ("the byte sidecars' counts (X_val_bytes_*.bin)" if sidecar is not None else
              f"the UTF-8 length of the decoded validation text ({counter.documents:,} documents, split at BOS)")
    cache: dict[int, int] = {}

    def upto(c: int) -> int:
        if cumulative is not None:
            return int(cumulative[c])
        if c not in cache:
            cache[c] = counter.upto(c)
        return cache[c]

    ranges, checked, notes = 0, [], []
    for name, data in sorted(ctx.receipts.items(), key=lambda kv: kv[0] != ROUNDTRIP):
        if (data.get("info") or {}).get("data_dir") and not ctx.opts.data_dir:
            notes.append(f"{name} scored other data ({data['info']['data_dir']}): not recounted")
            continue
        total = int(data.get("total_targets") or 0)
        if total > len(val) - 1:
            return FAIL, f"receipts/{name} scores {total:,} targets but the validation split has only {len(val) - 1:,}"
        counted_bytes = 0
        for lo, hi, stated_bytes in _scored_ranges(data.get("events", [])):
            want = upto(hi) - upto(lo)
            if stated_bytes != want:
                luts = ctx.tokenizer.byte_luts(ctx.cfg.model.vocab_size)
                tables = luts.count_bytes(val[lo:hi], val[lo + 1: hi + 1])
                what = "the byte sidecars count" if sidecar is not None else "their decoded text is"
                return FAIL, (f"receipts/{name}: targets ({lo}, {hi}] are counted as {stated_bytes:,} bytes, but "
                              f"{what} {want:,} UTF-8 bytes (off by {stated_bytes - want:+,}; the tokenizer's "
                              f"byte tables give {tables:,}): val_bpb is divided by the wrong byte count")
            counted_bytes += want
            ranges += 1
        checked.append(f"{name} {counted_bytes:,}")
    stated = sidecar_val_bytes(ctx.cfg.data.data_path)
    side = ""
    if stated is not None and sidecar is None:
        whole = upto(len(val) - 1)
        if whole != stated[0]:
            return FAIL, (f"{stated[1]} states {stated[0]:,} validation bytes, but the split decodes to {whole:,} "
                          "UTF-8 bytes")
        side = f"; the whole split decodes to {whole:,} bytes, the total {Path(stated[1]).name} states"
    return PASS, (f"{ranges} scored ranges in {len(checked)} receipts ({', '.join(checked)} bytes) equal {source}{side}"
                  + ("; " + "; ".join(notes) if notes else ""))


# Overlap reports by the exact files scanned (path, size, mtime): the seeds of one submission share
# their data, and scanning the full export's training shards takes minutes.
_OVERLAPS: dict[tuple, Any] = {}


def check_provenance(ctx: RunContext) -> tuple[str, str]:
    from pgolf.data.provenance import MIN_DOC_TOKENS, val_train_overlaps

    bos = int(ctx.tokenizer.bos_id)
    key = (bos, *((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in ctx.val_files + ctx.train_files))
    if key not in _OVERLAPS:
        _OVERLAPS[key] = val_train_overlaps(ctx.val_files, ctx.train_files, bos)
    report = _OVERLAPS[key]
    where = (f"{report.train_docs:,} training documents ({report.train_tokens:,} tokens in {len(ctx.train_files)} "
             f"shard{'s' * (len(ctx.train_files) > 1)})")
    if report.overlaps:
        shown = "; ".join(f"val document {o.val_doc} ({o.tokens:,} tokens) at token {o.offset:,} of {o.train_file}"
                          for o in report.overlaps[:5])
        more = f" and {len(report.overlaps) - 5} more" if len(report.overlaps) > 5 else ""
        return FAIL, (f"{len(report.overlaps)} of the {report.val_docs:,} validation documents appear among the "
                      f"{where}: {shown}{more}")
    short = (f"; {len(report.short)} documents shorter than {MIN_DOC_TOKENS} tokens occur in both (not counted)"
             if report.short else "")
    return PASS, (f"none of the {report.val_docs:,} validation documents appears among the {where}, each document "
                  f"hashed whole at BOS{short}")


def check_val_split(ctx: RunContext) -> tuple[str, str]:
    import numpy as np

    from pgolf.data.provenance import expected_val_docs

    ctx.val_files  # noqa: B018 - no shards here is a SKIP saying so
    expected = expected_val_docs(ctx.cfg.data.data_path)
    if expected is None:
        raise Skip(f"{ctx.cfg.data.data_path} is no named dataset variant (fineweb10B_<variant>, or a synthetic corpus "
                   "with its synthetic.json): no expected document count to compare with")
    have = int(np.count_nonzero(ctx.val_tokens == ctx.tokenizer.bos_id))
    if have != expected[0]:
        return FAIL, f"the validation split holds {have:,} documents, but {expected[1]} says {expected[0]:,}"
    return PASS, f"the validation split holds {have:,} documents, as {expected[1]} says"


def check_train_budget(ctx: RunContext) -> tuple[str, str]:
    if not ctx.finished:
        raise Skip(f"the run did not finish (status {ctx.summary.get('status', 'unknown')})")
    cap = ctx.cfg.train.max_wallclock_seconds
    train_s = ctx.summary["train_time_ms"] / 1000
    budget = f" of the {cap:g} s budget" if cap > 0 else "; no wall-clock budget: train.max_wallclock_seconds=0"
    e = ctx.cfg.export
    if not (e.gptq or e.allocate):
        return PASS, (f"training data read only by the training loop ({ctx.summary.get('steps')} steps, "
                      f"{train_s:.1f} s{budget}); the export calibrates on nothing")
    cal = ctx.summary.get("calibration")
    if cal is None:
        raise Skip("the export calibrated (GPTQ or the allocator) but summary.json has no calibration record: the run "
                   "predates it")
    logged = "calibration: " in ctx.log
    stamp = "" if logged else "; train.log has no calibration line"
    if cal.get("source") == "self_generated":
        return PASS, (f"the export calibrated on self-generated sequences ({cal['seconds']:.2f} s): no training "
                      f"data{stamp}")
    if cap <= 0:
        raise Skip(f"the export's calibration read training data ({cal.get('source')}, {cal['seconds']:.2f} s) but the "
                   "run has no wall-clock budget to place it in (train.max_wallclock_seconds=0: a non-record run)")
    used = train_s + float(cal["seconds"])
    after = used > cap
    numbers = f"training {train_s:.1f} s + calibration {float(cal['seconds']):.2f} s = {used:.1f} s"
    if cal.get("training_data_after_budget") not in (None, after):
        return FAIL, (f"summary.json says training data after the budget: {cal.get('training_data_after_budget')}, but "
                      f"its own numbers say {after}: {numbers} against {cap:g} s")
    if after:
        return FAIL, (f"the export's calibration ({cal.get('source')}) read training data past the {cap:g} s budget: "
                      f"{numbers}{stamp}")
    return PASS, (f"the export's calibration ({cal.get('source')}) read training data inside the {cap:g} s budget: "
                  f"{numbers} (reserve {float(cal.get('reserve_seconds', 0)):.1f} s, {cal.get('reserve')}){stamp}")


@contextlib.contextmanager
def traced_shard_reads():
    """Every shard file read (pgolf.data.shards.read_shard, the one reader of shards) while inside."""
    import pgolf.data.shards as shards

    original, seen = shards.read_shard, []

    def traced(path, *args, **kwargs):
        seen.append(Path(path).resolve())
        return original(path, *args, **kwargs)

    shards.read_shard = traced
    try:
        yield seen
    finally:
        shards.read_shard = original


def check_eval_data(ctx: RunContext) -> tuple[str, str]:
    from pgolf.eval.run import EvalOptions, run_eval
    from pgolf.eval.ttt import TTTConfig

    val = {p.resolve() for p in ctx.val_files}
    try:
        train = {p.resolve() for p in ctx.train_files}
    except Skip:
        train = set()
    both = sorted(val & train)
    if both:
        return FAIL, (f"the validation pattern {ctx.cfg.data.val_pattern} also matches training shards: "
                      f"{', '.join(p.name for p in both)}")
    if not ctx.rd.artifact.exists():
        raise Skip(f"no artifact {RunDir.ARTIFACT} to evaluate: the run did not finish")
    ctx.tokenizer  # noqa: B018 - a tokenizer missing here is a SKIP, not an evaluation error
    seq_len = ctx.cfg.train.train_seq_len
    kinds = ["standard/sliding"] + (["TTT"] if any(m.kind == "ttt" for m in ctx.modes) else [])
    with tempfile.TemporaryDirectory() as tmp, traced_shard_reads() as seen:
        for i, kind in enumerate(kinds):
            ttt = TTTConfig(chunk_tokens=max(seq_len // 2, 1), epochs=1) if kind == "TTT" else None
            opts = EvalOptions(max_tokens=1, ttt=ttt, data_dir=ctx.opts.data_dir, device=ctx.opts.device,
                               compile="off", receipt_path=str(Path(tmp) / f"receipt-{i}.json"))
            run_eval(str(ctx.dir), opts, log=lambda *_: None)
    read = sorted(set(seen))
    leaked = [p for p in read if p in train]
    if leaked:
        return FAIL, f"the evaluation read training data: {', '.join(p.name for p in leaked)}"
    other = [p.name for p in read if p not in val]
    names = ", ".join(p.name for p in read if p in val)
    return PASS, (f"`pgolf eval` traced on a prefix ({' and '.join(kinds)}): it read {names} only"
                  + (f" and {', '.join(other)}" if other else "") + f", none of the {len(train)} training shards; "
                  "the validation and training patterns match disjoint files")


def built_bundle(config: dict, code_description: str) -> bytes:
    """train_gpt.py as `pgolf submit` would ship it for this config (packed as the run counted it)."""
    from pgolf.train.bundle import build_bundle, bundle_modules, compressor_of

    return build_bundle(config, bundle_modules(config), compressor_of(code_description))


def check_artifact(ctx: RunContext) -> tuple[str, str]:
    from pgolf.compress.container import read_artifact

    size = ctx.summary.get("size") or {}
    if not ctx.rd.artifact.exists():
        if ctx.finished:
            return FAIL, f"the run finished but its artifact {RunDir.ARTIFACT} is missing"
        raise Skip("the run did not finish: it has no artifact")
    data = ctx.rd.artifact.read_bytes()
    model_bytes = len(data)
    recorded = size.get("artifact_sha256")
    digest = hashlib.sha256(data).hexdigest()
    if recorded is not None and digest != recorded:
        return FAIL, (f"{RunDir.ARTIFACT} has sha256 {digest[:16]}.., not the {recorded[:16]}.. the run recorded at "
                      "export")
    if size.get("model_bytes") not in (None, model_bytes):
        return FAIL, f"{RunDir.ARTIFACT} is {model_bytes:,} bytes but the run accounted {size['model_bytes']:,}"
    try:
        read_artifact(ctx.rd.artifact)
    except (OSError, ValueError) as exc:
        return FAIL, f"{RunDir.ARTIFACT} does not read back: {exc}"
    description = str(size.get("code_description", ""))
    bundle = ctx.opts.bundle if ctx.opts.bundle is not None else built_bundle(ctx.config_dict, description)
    code = len(bundle)
    built = hashlib.sha256(bundle).hexdigest()[:16]
    counted = SHA.search(description)
    total = model_bytes + code
    if size.get("code_bytes") is None or counted is None:
        if total > SIZE_CAP_BYTES:
            return FAIL, f"{RunDir.ARTIFACT} {model_bytes:,} + train_gpt.py {code:,} = {total:,} bytes, over the cap"
        raise Skip(f"summary.json records no counted code (bytes and sha256); recomputed: {model_bytes:,} + {code:,} = "
                   f"{total:,} bytes")
    if size["code_bytes"] != code or counted[1] != built:
        return FAIL, (f"the run counted {size['code_bytes']:,} code bytes (sha256:{counted[1]}) but the train_gpt.py "
                      f"built now is {code:,} bytes (sha256:{built}): the shipped code is not the counted code (the "
                      "pgolf code changed since the run; run it again with this pgolf)")
    if total > SIZE_CAP_BYTES:
        return FAIL, (f"{RunDir.ARTIFACT} {model_bytes:,} + train_gpt.py {code:,} = {total:,} bytes, over the "
                      f"{SIZE_CAP_BYTES:,}-byte cap by {total - SIZE_CAP_BYTES:,}")
    return PASS, (f"{RunDir.ARTIFACT} {model_bytes:,} + train_gpt.py {code:,} = {total:,} <= {SIZE_CAP_BYTES:,} bytes, "
                  f"recomputed from the files; train_gpt.py built now is the code the run counted (sha256:{built})"
                  + ("" if recorded else "; the run predates recorded artifact digests"))


def check_row(key: str, label: str, fn: Callable[[], tuple[str, str]], opts: CheckOptions, target: str = "") -> Row:
    if key in opts.skip:
        return Row(key, label, SKIP, "skipped (--skip)", target)
    try:
        status, detail = fn()
    except Skip as exc:
        return Row(key, label, SKIP, str(exc), target)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        return Row(key, label, FAIL, f"could not be checked: {type(exc).__name__}: {exc}", target)
    return Row(key, label, status, detail, target)


def check_run(run_dir: str | Path, opts: CheckOptions | None = None, target: str = "") -> list[Row]:
    """Every check of one run directory, in KEYS order."""
    opts = opts or CheckOptions()
    ctx = RunContext(run_dir, opts)
    rows = []
    try:
        modes = ctx.modes
    except Skip as exc:
        modes, rows = [], [Row("c1", "C1 causal", SKIP, str(exc), target)]
    for mode in modes:
        rows.append(check_row("c1", f"C1 causal ({mode.label})", lambda m=mode: check_causal(ctx, m), opts, target))
    rows += [
        check_row("c2", "C2 normalized", lambda: check_normalized(ctx), opts, target),
        check_row("c3", "C3 score before update", lambda: check_score_first(ctx), opts, target),
        check_row("c4", "C4 single pass", lambda: check_single_pass(ctx), opts, target),
        check_row("bytes", "byte accounting", lambda: check_bytes(ctx), opts, target),
        check_row("provenance", "data provenance", lambda: check_provenance(ctx), opts, target),
        check_row("val-split", "validation split", lambda: check_val_split(ctx), opts, target),
        check_row("train-budget", "phases: training budget", lambda: check_train_budget(ctx), opts, target),
        check_row("eval-data", "phases: evaluation data", lambda: check_eval_data(ctx), opts, target),
        check_row("artifact", "artifact", lambda: check_artifact(ctx), opts, target),
    ]
    return rows


def failed(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.status == FAIL]
