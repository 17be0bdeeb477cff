"""`pgolf plan CONFIG [section.key=value ...]`: the planner's table (or --json), exit 3 when over the cap.

Kept apart from pgolf.lab.plan so that building the command line does not import torch."""

from __future__ import annotations

import argparse
import json
import sys

from pgolf.rules import EXIT_OK, EXIT_OVER_CAP


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens-per-sec", type=float, default=None, metavar="N",
                   help="training throughput for the steps row (default: measured by the newest finished run "
                        "in run.runs_dir with the same model, batch and sequence length)")
    p.add_argument("--from", dest="from_run", default=None, metavar="RUN",
                   help="draw the weights for the size estimate with statistics measured on RUN's checkpoint")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def register(subparsers) -> None:
    from pgolf.lab.experiments import add_options_and_overrides

    p = subparsers.add_parser("plan", help="parameters, FLOPs, steps and estimated artifact bytes of a config, "
                                           "before training")
    p.add_argument("config", metavar="CONFIG", help="preset name or TOML path, as for `pgolf train --config`")
    add_options_and_overrides(p, _options)
    p.set_defaults(handler=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from pgolf.config.resolve import resolve_config
    from pgolf.lab.experiments import parse_options_and_overrides
    from pgolf.lab.plan import plan_config

    args = parse_options_and_overrides(args)
    cfg, _applied = resolve_config(args.config, args.overrides)
    plan = plan_config(cfg, tokens_per_sec=args.tokens_per_sec, from_run=args.from_run)
    plan["config"] = {"preset": args.config, "overrides": list(args.overrides)}
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        render(plan)
    size = plan["size"]
    if size["fits"]:
        return EXIT_OK
    print(over_cap_message(plan), file=sys.stderr)
    return EXIT_OVER_CAP


def over_cap_message(plan: dict) -> str:
    size = plan["size"]
    lines = [f"pgolf plan: predicted total {size['total_bytes']:,} bytes is OVER the {size['cap']:,}-byte cap by "
             f"{size['overage']:,} bytes (model {size['model_bytes']:,}, an estimate, + code {size['code_bytes']:,}); "
             "levers:"]
    lines += [f"  - {lever}" for lever in plan.get("levers", [])]
    return "\n".join(lines)


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _table(title: str, columns: tuple[str, ...], rows: list[tuple], justify: str = "right"):
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else justify)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    return table


def render(plan: dict) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    params, total = plan["params"], plan["params"]["total"]
    console.print(_table("Parameters", ("component", "params", "share"),
                         [(k, f"{v:,}", f"{100 * v / max(total, 1):.1f}%") for k, v in params.items()
                          if k != "total" and v] + [("total", f"{total:,}", "100%")]))
    flops, per_step = plan["flops"]["per_token"], plan["flops"]["per_step"]
    depth, tokens = plan["depth"], plan["tokens"]
    console.print()
    console.print(_table("Compute", ("", "per token", "per step"), [
        ("depth (unique / effective)", f"{depth['unique']} / {depth['effective']}", ""),
        ("tokens (seq len / per step)", f"{tokens['seq_len']:,}", f"{tokens['per_step']:,}"),
        ("FLOPs forward", _si(flops["forward"]), _si(per_step["forward"])),
        ("  weight matmuls", _si(flops["forward_matmul"]), _si(per_step["forward_matmul"])),
        ("  attention", _si(flops["forward_attention"]), _si(per_step["forward_attention"])),
        ("FLOPs backward", _si(flops["backward"]), _si(per_step["backward"])),
        ("FLOPs forward + backward", _si(flops["total"]), _si(per_step["total"])),
    ]))
    console.print(f"[dim]{plan['flops']['note']}[/dim]")
    t = plan["time"]
    console.print()
    if t["tokens_per_sec"]:
        budget = f"{t['wallclock_seconds']:.0f} s" if t["wallclock_seconds"] is not None else "no cap"
        rows = [("throughput", f"{_si(t['tokens_per_sec'])} tokens/s ({t['source']})"),
                ("step time", f"{1000 * t['step_seconds']:.1f} ms"),
                ("steps that fit in the budget", f"{t['steps_fit']:,} in {budget}" if t["steps_fit"] is not None
                 else f"no wall-clock cap ({t['iterations_seconds']:.0f} s for train.iterations)"),
                ("steps trained", f"{t['steps']:,} (stopped by {t['stopped_by']})"),
                ("tokens trained", f"{t['train_tokens']:,}"),
                ("training FLOPs", _si(t.get("train_flops")))]
    else:
        rows = [("throughput", "unknown: no finished run in run.runs_dir matches this model, batch and sequence "
                               "length; give --tokens-per-sec N for the steps that fit the wall-clock budget")]
    console.print(_table("Time", ("", ""), rows, justify="left"))
    size = plan["size"]
    console.print()
    raw = size["components_raw"]
    rows = [(f"  {k}", f"{v:,}", "") for k, v in raw.items()]
    rows = [*rows, ("model bytes (estimate)", f"{sum(raw.values()):,}", f"{size['model_bytes']:,}"),
            ("code bytes (exact)", "", f"{size['code_bytes']:,}"),
            ("total", "", f"{size['total_bytes']:,} / {size['cap']:,}")]
    console.print(_table(f"Artifact: {size['compressor']}, storage {size['storage']}, layout {size['layout']}",
                         ("", "raw bytes", "compressed"), rows))
    formats = ", ".join(f"{fmt} {n:,}" for fmt, n in size["params_by_format"].items())
    console.print(f"[dim]parameters by format: {formats}[/dim]")
    console.print(f"[dim]code: {size['code_description']}[/dim]")
    w = size["weights"]
    console.print(f"[dim]estimate: weights drawn as after {w['steps']:,} steps, {w['source']}[/dim]")
    for line in size["export_lines"] + size["notes"]:
        console.print(f"[dim]{line}[/dim]")
    verdict = (f"[green]fits[/green]: {size['cap'] - size['total_bytes']:,} bytes to spare" if size["fits"]
               else f"[red]OVER[/red] by {size['overage']:,} bytes")
    console.print(f"\npredicted total {size['total_bytes']:,} bytes: {verdict} (planned in {plan['seconds']:.1f} s)")

