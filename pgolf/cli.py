"""`pgolf` command line: train, eval, audit, data, config."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from pgolf.config import Config, ConfigError, official_env_present
from pgolf.config.resolve import DEFAULT_PRESET, OFFICIAL_DEFAULT_PRESET, data_dir_overrides, resolve_config
from pgolf.lab.check_cli import register as register_check
from pgolf.lab.experiments import register_compare, register_run
from pgolf.lab.export_cli import register as register_export
from pgolf.lab.ledger import LedgerHooks, live_runs_on_host, register as register_ledger
from pgolf.lab.plots import register as register_plot
from pgolf.lab.plan_cli import register as register_plan
from pgolf.lab.submit import register as register_submit
from pgolf.lab.sweep import register as register_sweep
from pgolf.eval.ttt import TTTConfig
from pgolf.eval.doc_ttt import DocTTTConfig
from pgolf import __version__
from pgolf.rules import (EVAL_TIME_LIMIT_S, EXIT_CODES, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE,
                         MICRO_BATCHES, summary_exit_code)
from pgolf.runs import RunDir

# Set by `pgolf train --nproc`: workers then report handled outcomes through summary.json and
# exit 0, so torchrun does not bury them under its own failure traceback.
LAUNCHED_ENV = "PGOLF_LAUNCHED"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"preset name or TOML path (default: {DEFAULT_PRESET}, the synthetic CPU smoke run)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="train on the official shard layout in DIR (fineweb_train_*.bin, fineweb_val_*.bin, "
                             "and the tokenizer .model in DIR unless data.tokenizer_path is given)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override single config keys, e.g. model.num_layers=11 train.iterations=500")


def exit_status_epilog() -> str:
    """pgolf.rules.EXIT_CODES as `pgolf --help` prints it."""
    return "exit status:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgolf", description="Parameter golf: train, compress, evaluate.",
                                     epilog=exit_status_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pgolf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model, export the artifact and score its roundtrip")
    _add_config_args(train)
    train.add_argument("--resume", metavar="RUN", help="continue a stopped run (run id or directory)")
    train.add_argument("--nproc", type=int, default=None,
                       help="launch N data-parallel processes with torchrun (1, 2, 4 or 8)")
    train.add_argument("--force", action="store_true",
                       help="train even when the planner's fast lower bound says the artifact cannot fit the cap")

    ev = sub.add_parser("eval", help="score a run's artifact (standard, sliding window or score-first TTT)")
    ev.add_argument("target", help="a run directory (runs/<id>) or an artifact file (.pgolf)")
    ev.add_argument("--stride", type=int, default=None,
                    help="window stride, also of --ttt's scoring (default: the run's train.eval_stride, the stride "
                         "its roundtrip was scored with; seq_len, the standard evaluation, when that is 0)")
    ev.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's train_seq_len)")
    ev.add_argument("--batch", type=int, default=64, help="windows per forward pass per process (default 64)")
    ev.add_argument("--max-tokens", type=int, default=0, help="score only the first N val tokens (0 = all)")
    ev.add_argument("--live", action="store_true", help="score the run's last checkpoint, not the artifact")
    ev.add_argument("--data", default=None, metavar="DIR", help="validation shards from DIR instead of the run's")
    ev.add_argument("--receipt", default=None, help="where to write the receipt (default: the run's receipts/)")
    ev.add_argument("--budget", type=float, default=EVAL_TIME_LIMIT_S,
                    help=f"evaluation budget in seconds (default {EVAL_TIME_LIMIT_S:.0f})")
    ev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.add_argument("--ttt", action="store_true", help="score-first test-time training")
    ttt_defaults = TTTConfig()
    ev.add_argument("--ttt-chunk", type=int, default=ttt_defaults.chunk_tokens, help="tokens per TTT chunk")
    ev.add_argument("--ttt-lr", type=float, default=ttt_defaults.lr)
    ev.add_argument("--ttt-momentum", type=float, default=ttt_defaults.momentum)
    ev.add_argument("--ttt-epochs", type=int, default=ttt_defaults.epochs)
    ev.add_argument("--ttt-freeze", type=int, default=ttt_defaults.freeze_blocks, help="freeze the first N blocks")
    ev.add_argument("--ttt-clip", type=float, default=ttt_defaults.grad_clip, help="gradient-norm clip (0 = off)")
    ev.add_argument("--ttt-batch", type=int, default=ttt_defaults.batch_seqs, help="sequences per TTT step")
    ev.add_argument("--ttt-mode", choices=("sgd", "doc_lora"), default=None,
                    help="sgd: --ttt's score-first SGD over chunks of the stream; doc_lora: phased score-first "
                         "per-document LoRA TTT (#1855), its settings below (defaults: the record's)")
    doc = DocTTTConfig()
    ev.add_argument("--doc-chunk", type=int, default=doc.chunk_tokens, help="doc_lora: targets per chunk")
    ev.add_argument("--doc-context", type=int, default=doc.context,
                    help="doc_lora: most tokens of its own document a window reads (also the phase rows' length)")
    ev.add_argument("--doc-batch", type=int, default=doc.batch_docs, help="doc_lora: documents per batch")
    ev.add_argument("--lora-rank", type=int, default=doc.rank)
    ev.add_argument("--lora-alpha", type=float, default=doc.alpha, help="LoRA output scale alpha / rank")
    ev.add_argument("--lora-lr", type=float, default=doc.lr, help="AdamW lr of the LoRAs (betas (0, --lora-beta2))")
    ev.add_argument("--lora-beta2", type=float, default=doc.beta2)
    ev.add_argument("--lora-wd", type=float, default=doc.weight_decay, help="AdamW weight decay of the LoRAs")
    ev.add_argument("--lora-sites", default=",".join(doc.sites), help="LoRA sites: some of q,k,v,o,mlp,head")
    ev.add_argument("--phases", default=",".join(map(str, doc.phases)),
                    help="doc_lora: documents scored before each global phase (none: no phases)")
    ev.add_argument("--phase-lr", type=float, default=doc.phase_lr, help="global phase SGD lr (cosine over chunks)")
    ev.add_argument("--phase-momentum", type=float, default=doc.phase_momentum)
    ev.add_argument("--phase-epochs", type=int, default=doc.phase_epochs)
    ev.add_argument("--phase-chunk", type=int, default=doc.phase_chunk_tokens, help="global phase tokens per chunk")
    ev.add_argument("--phase-batch", type=int, default=doc.phase_batch_seqs, help="global phase rows per step")
    ev.add_argument("--phase-clip", type=float, default=doc.phase_clip, help="global phase gradient clip (0 = off)")

    audit = sub.add_parser("audit", help="re-check an evaluation receipt (legality of TTT, exact sums)")
    audit.add_argument("receipt", help="a receipt JSON written by `pgolf eval` or `pgolf train`")
    audit.add_argument("--rescore", action="store_true",
                       help="also recompute the scores from the artifact and compare them (exactly where replayable)")
    audit.add_argument("--artifact", default=None, metavar="PATH",
                       help="with --rescore: the artifact that was scored (default: the run's model.pgolf)")
    audit.add_argument("--data", default=None, metavar="DIR",
                       help="with --rescore: the validation shards it was scored on (default: the run's data)")
    audit.add_argument("--sample", type=int, default=None, metavar="N",
                       help="with --rescore of a TTT receipt: replay only the first N chunks (default: all)")
    audit.add_argument("--device", default="auto", help="with --rescore: auto (the receipt's device type when "
                                                        "available, else cpu), cpu or cuda")

    config = sub.add_parser("config", help="print the resolved config as JSON")
    _add_config_args(config)

    data = sub.add_parser("data", help="download or build datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fw = data_sub.add_parser("fineweb", help="download the official cached FineWeb export from the Hugging Face hub")
    fw.add_argument("--variant", default="sp1024",
                    help="sp<VOCAB> (e.g. sp1024, sp8192), byte260, or sp8192_caseops (CaseOps, with val byte sidecars)")
    fw.add_argument("--train-shards", type=int, default=80, help="number of 100M-token train shards (default 80)")
    fw.add_argument("--root", default="data", help="where datasets/ and tokenizers/ go (default ./data)")
    fw.add_argument("--repo", "--repo-id", dest="repo_id", default=None,
                    help="Hugging Face dataset repo (default: the variant's: willdepueoai/parameter-golf; sp8192: "
                         "kevclark/parameter-golf; sp8192_caseops: romeerp/parameter-golf-caseops-v1)")
    fw.add_argument("--from-dir", default=None, help="copy from a local mirror of the hub repo instead of downloading")
    fw.add_argument("--with-docs", action="store_true", help="also fetch the raw selected documents")

    tok = data_sub.add_parser("tokenize", help="turn JSONL/text documents into official-format shards")
    tok.add_argument("input", help="a .jsonl file ({\"text\": ...} per line), a .txt file or a directory of .txt")
    tok.add_argument("--tokenizer", required=True, help="SentencePiece .model path, or byte260")
    tok.add_argument("--out", required=True, help="output directory for the shards")
    tok.add_argument("--val-docs", type=int, default=None,
                     help="the first N documents form the val split (default: the count the documents' manifest "
                          "states, 50,000 for the official docs_selected.jsonl)")
    tok.add_argument("--force-val-docs", action="store_true",
                     help="build with a --val-docs that differs from the expected count (official validation "
                          "documents then leak into training, or training documents are scored)")
    tok.add_argument("--caseops", action="store_true",
                     help="tokenize the CaseOps form of each document and write val byte sidecars (the tokenizer "
                          "must carry the operators: pgolf data train-tokenizer --caseops)")
    tok.add_argument("--byte-sidecar", action="store_true",
                     help="write val byte sidecars (fineweb_val_bytes_*.bin) without CaseOps")
    tok.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 1e8)")
    tok.add_argument("--prefix", default="fineweb", help="shard file prefix (default fineweb)")
    tok.add_argument("--overwrite", action="store_true", help="replace shards already in --out")

    tt = data_sub.add_parser("train-tokenizer", help="train a SentencePiece BPE tokenizer on documents")
    tt.add_argument("input", help="a .jsonl file ({\"text\": ...} per line), a .txt file or a directory of .txt")
    tt.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, e.g. 8192")
    tt.add_argument("--out", required=True, help="the .model path to write (a .vocab goes beside it)")
    tt.add_argument("--caseops", action="store_true",
                    help="train on the CaseOps form, with the four operators as user-defined pieces")
    tt.add_argument("--skip-docs", type=int, default=0,
                    help="leave out the first N documents (e.g. 50000: the validation split)")
    tt.add_argument("--max-docs", type=int, default=None, help="train on at most N documents")
    tt.add_argument("--normalization", default="identity",
                    help="SentencePiece normalization rule (default identity: lossless; the official one is nmt_nfkc)")

    for name, handler in (("eval", cmd_eval), ("audit", cmd_audit), ("config", cmd_config), ("data", cmd_data)):
        sub.choices[name].set_defaults(handler=handler)
    # Commands that live in their own modules register their parser and handler here.
    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


# Each entry: a function (subparsers) -> None that adds one command and sets `handler`.
EXTRA_COMMANDS: list = [register_submit, register_ledger, register_run, register_compare, register_sweep,
                        register_plot, register_plan, register_export, register_check]


def _resolve(args: argparse.Namespace) -> tuple[Config, list[str], str]:
    preset = args.config or (OFFICIAL_DEFAULT_PRESET if official_env_present(os.environ) else DEFAULT_PRESET)
    overrides = list(args.overrides)
    if args.data:
        overrides = data_dir_overrides(Path(args.data), overrides) + overrides
    cfg, applied = resolve_config(preset, overrides)
    return cfg, applied, preset


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


def _launch_torchrun(args: argparse.Namespace, argv: list[str]) -> int:
    """Validate here once, then start N workers on a run id chosen here, and report its outcome."""
    if args.nproc < 1 or MICRO_BATCHES % args.nproc:
        raise ConfigError(f"--nproc {args.nproc}: use 1, 2, 4 or 8 processes (they must divide the 8 micro-batches)")
    forwarded = _without_nproc(argv)
    if args.resume:
        from pgolf.runs import find_run_dir

        run_dir = find_run_dir(args.resume)
    else:
        from pgolf.runs import new_run_id

        cfg, _, _ = _resolve(args)
        refused = _size_gate(cfg, args.force)
        if refused is not None:
            return refused
        run_id = cfg.run.run_id or new_run_id(cfg)
        run_dir = Path(cfg.run.runs_dir) / run_id
        if run_dir.exists():
            raise ConfigError(f"run directory {run_dir} already exists; choose another run.run_id")
        forwarded.append(f"run.run_id={run_id}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "pgolf", *forwarded]
    print("launching: " + " ".join(cmd), flush=True)
    launcher = subprocess.Popen(cmd, env={**os.environ, LAUNCHED_ENV: "1"})
    # A scheduler's SIGTERM reaches this process only: pass it on, so torchrun stops the workers
    # and each checkpoints and exits as an interrupted run (Ctrl-C reaches the whole group).
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: launcher.send_signal(signal.SIGTERM))
    try:
        code = launcher.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary_path = RunDir(run_dir).summary
    if summary_path.exists():
        return summary_exit_code(json.loads(summary_path.read_text(encoding="utf-8")))
    # No summary: the workers died before writing one; keep torchrun's status only where it is ours.
    return code if code in EXIT_CODES and code != EXIT_OK else EXIT_FAILED


def _size_gate(cfg: Config, force: bool) -> int | None:
    """The planner's fast lower bound on the artifact, before anything is built (pgolf.lab.plan_cli)."""
    from pgolf.lab.plan import size_gate

    return size_gate(cfg, force, "pgolf train")


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    if args.nproc is not None and "RANK" not in os.environ:
        return _launch_torchrun(args, argv)
    from pgolf.train.run import run_training

    if args.resume:
        if args.overrides or args.config or args.data:
            raise ConfigError("--resume continues a run with its saved config exactly; it takes no --config, "
                              "--data or overrides (start a new run to change settings)")
        others = live_runs_on_host(Config().run.runs_dir, exclude=Path(args.resume).name)
        summary = run_training(Config(), resume=args.resume, hooks=LedgerHooks(), other_runs=others)
    else:
        cfg, applied, preset = _resolve(args)
        refused = None if os.environ.get(LAUNCHED_ENV) else _size_gate(cfg, args.force)
        if refused is not None:
            return refused
        others = live_runs_on_host(cfg.run.runs_dir, exclude=cfg.run.run_id or None)
        summary = run_training(cfg, preset=preset, env_applied=applied, hooks=LedgerHooks(), other_runs=others)
    if os.environ.get(LAUNCHED_ENV):
        return EXIT_OK
    return summary_exit_code(summary)


def cmd_eval(args: argparse.Namespace) -> int:
    from pgolf.eval.run import EvalOptions, check_eval_options, run_eval

    ttt = TTTConfig(chunk_tokens=args.ttt_chunk, lr=args.ttt_lr, momentum=args.ttt_momentum,
                    epochs=args.ttt_epochs, freeze_blocks=args.ttt_freeze, grad_clip=args.ttt_clip,
                    batch_seqs=args.ttt_batch)
    phases = args.phases.strip().lower()
    try:
        phase_counts = () if phases in ("", "none", "0") else tuple(int(n) for n in phases.split(","))
    except ValueError:
        raise ConfigError(f"--phases must be document counts such as 833,1666,2500 (or none), got {args.phases!r}")
    doc_ttt = DocTTTConfig(chunk_tokens=args.doc_chunk, context=args.doc_context, batch_docs=args.doc_batch,
                           rank=args.lora_rank, alpha=args.lora_alpha, lr=args.lora_lr, beta2=args.lora_beta2,
                           weight_decay=args.lora_wd,
                           sites=tuple(s.strip() for s in args.lora_sites.split(",") if s.strip()),
                           phases=phase_counts, phase_lr=args.phase_lr, phase_momentum=args.phase_momentum,
                           phase_epochs=args.phase_epochs, phase_chunk_tokens=args.phase_chunk,
                           phase_batch_seqs=args.phase_batch, phase_clip=args.phase_clip)
    mode = args.ttt_mode or ("sgd" if args.ttt else None)
    opts = EvalOptions(stride=args.stride, seq_len=args.seq_len, batch_windows=args.batch, max_tokens=args.max_tokens,
                       ttt=ttt if mode == "sgd" else None, doc_ttt=doc_ttt if mode == "doc_lora" else None,
                       live=args.live, data_dir=args.data, receipt_path=args.receipt,
                       budget_seconds=args.budget, device=args.device)
    check_eval_options(opts, ttt, doc_ttt)  # every TTT number too: a typo is refused whatever the mode
    result = run_eval(args.target, opts, log=(lambda *_: None) if args.json else print, hooks=LedgerHooks())
    if args.json and os.environ.get("RANK", "0") == "0":
        print(json.dumps(result, indent=2))
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from pgolf.eval.audit import AuditFailure, audit_file, rescore_file

    rescore_only = [o for o, v in (("--artifact", args.artifact), ("--data", args.data), ("--sample", args.sample))
                    if v is not None]
    if rescore_only and not args.rescore:
        raise ConfigError(f"{', '.join(rescore_only)} only apply with --rescore")
    if args.sample is not None and args.sample < 1:
        raise ConfigError(f"--sample must be at least 1 (TTT chunks to replay), got {args.sample}")
    try:
        report = audit_file(args.receipt)
        if args.rescore:
            rescored = rescore_file(args.receipt, args.artifact, args.data, args.sample, args.device)
    except AuditFailure as exc:
        print(f"FAIL {args.receipt}: {exc}")
        return EXIT_FAILED
    print(f"OK {args.receipt}: {report.kind} val_bpb {report.val_bpb:.8f} val_loss {report.val_loss:.8f} over "
          f"{report.scored_targets:,} targets, {report.updates} updates, each scored before any update used it"
          + ("; rescored from the artifact:" if args.rescore else ""))
    if args.rescore:
        print("\n".join(f"  {line}" for line in rescored.lines))
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    cfg, applied, preset = _resolve(args)
    print(json.dumps({"preset": preset, "env": applied, "config": cfg.to_dict()}, indent=2))
    return EXIT_OK


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "fineweb":
        from pgolf.data.fineweb import download_fineweb

        kwargs = {"repo_id": args.repo_id} if args.repo_id else {}
        report = download_fineweb(variant=args.variant, train_shards=args.train_shards, root=args.root,
                                  with_docs=args.with_docs, source_dir=args.from_dir, **kwargs)
        print(json.dumps(report, indent=2, default=str))
        return EXIT_OK
    from pgolf.data.build import tokenize_to_shards, train_tokenizer
    from pgolf.data.tokenizer import load_tokenizer

    if args.data_command == "train-tokenizer":
        path = train_tokenizer(args.input, args.out, args.vocab_size, caseops=args.caseops, skip_docs=args.skip_docs,
                               max_docs=args.max_docs, normalization=args.normalization)
        print(json.dumps({"model": str(path), "vocab_size": load_tokenizer(path).vocab_size, "caseops": args.caseops}))
        return EXIT_OK
    tokenizer = load_tokenizer(args.tokenizer)
    stats = tokenize_to_shards(args.input, tokenizer, args.out, num_val_docs=args.val_docs,
                               shard_tokens=args.shard_tokens, prefix=args.prefix, overwrite=args.overwrite,
                               caseops=args.caseops, byte_sidecar=args.byte_sidecar, force_val_docs=args.force_val_docs)
    print(json.dumps(stats, indent=2, default=str))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    is_main_rank = os.environ.get("RANK", "0") == "0"
    try:
        if args.command == "train":
            return cmd_train(args, argv)
        return args.handler(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (ConfigError, OSError, ValueError, RuntimeError) as exc:
        if is_main_rank:  # under torchrun every rank fails alike; say it once
            print(f"pgolf {args.command}: error: {exc}", file=sys.stderr)
        if os.environ.get(LAUNCHED_ENV):
            return EXIT_OK  # the launcher reports it
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
