"""Artifact bytes of one set of weights under every quantization scheme x compressor x
storage x layout.

For each scheme (int8, int6, int5, int4), with and without the per-row clip search
("int8" without search is the official int8 export; intN without search uses the max-abs
clip), the weights are quantized once and packed by every compressor (zlib, zstd, lzma,
and brotli when installed) in every storage ("bytes": one code per byte, "packed": N bits
per code) and layout ("plain", "grouped": same-kind data together, byte planes). Prints a
table of artifact bytes, plus bytes per quantized parameter (artifact bytes / elements
stored as integer codes) and per parameter (artifact bytes / all elements), and the
relative squared reconstruction error of the quantized tensors
(sum (w - w_hat)^2 / sum w^2). No bpb is measured here.

    python benchmarks/compression_matrix.py runs/<id>                # latest checkpoint's "model"
    python benchmarks/compression_matrix.py path/to/state_dict.pt --out matrix.json
    python benchmarks/compression_matrix.py --random 512x1024        # one random normal matrix

The artifacts carry no meta (empty JSON), so the numbers are the weights alone.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from pgolf.compress.container import LAYOUTS, STORAGES, available_compressors, pack_artifact
from pgolf.compress.quant import dequantize_state_dict, quantize_state_dict

SCHEMES = ("int8", "int6", "int5", "int4")


def latest_checkpoint(run_dir: Path) -> Path:
    ckpts = run_dir / "checkpoints"
    found = []
    for p in ckpts.glob("step_*.pt"):
        m = re.fullmatch(r"step_(\d+)\.pt", p.name)  # skips optimizer shards step_N.opt0.pt
        if m:
            found.append((int(m.group(1)), p))
    if not found:
        raise SystemExit(f"no checkpoints/step_<N>.pt under {run_dir}")
    return max(found)[1]


def load_state_dict(source: str | None, random: str | None, seed: int) -> tuple[dict, str]:
    if random:
        rows, cols = (int(v) for v in random.lower().split("x"))
        g = torch.Generator().manual_seed(seed)
        return {"w": torch.randn(rows, cols, generator=g)}, f"random normal {rows}x{cols} (seed {seed})"
    path = Path(source)
    if path.is_dir():
        path = latest_checkpoint(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SystemExit(f"{path} holds no state dict (expected a dict of tensors or a checkpoint with 'model')")
    return sd, str(path)


def relative_error(sd: dict, qdict: dict) -> float:
    deq = dequantize_state_dict(qdict)
    num = den = 0.0
    for k, qt in qdict.items():
        if qt.kind.startswith("int"):
            w = sd[k].detach().float()
            num += float((deq[k].float() - w).square().sum())
            den += float(w.square().sum())
    return num / den if den else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", nargs="?", help="run directory (runs/<id>) or a state dict / checkpoint .pt")
    ap.add_argument("--random", metavar="ROWSxCOLS", help="use one random normal matrix instead")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--compressors", default=",".join(available_compressors()))
    ap.add_argument("--jobs", type=int, default=None, help="compression threads (default: up to 8)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if not args.source and not args.random:
        ap.error("give a run directory / state dict path, or --random ROWSxCOLS")

    sd, desc = load_state_dict(args.source, args.random, args.seed)
    total = sum(t.numel() for t in sd.values())
    print(f"weights: {desc}: {len(sd)} tensors, {total:,} params")
    rows = []
    for scheme in args.schemes.split(","):
        for search in (False, True):
            t0 = time.perf_counter()
            qdict, stats = quantize_state_dict(sd, scheme=scheme, clip_search=search)
            qtime = time.perf_counter() - t0
            err = relative_error(sd, qdict)
            for comp in args.compressors.split(","):
                trials: list[dict] = []
                t0 = time.perf_counter()
                pack_artifact(qdict, {}, compressor=comp, storage="auto", layout="auto", jobs=args.jobs, trials=trials)
                ptime = time.perf_counter() - t0
                for tr in trials:
                    rows.append({"scheme": scheme, "clip_search": search, "compressor": comp,
                                 "storage": tr["storage"], "layout": tr["layout"], "bytes": tr["bytes"],
                                 "best_for_compressor": tr["chosen"],
                                 "bytes_per_quantized_param": tr["bytes"] / max(1, stats.quantized_params),
                                 "bytes_per_param": tr["bytes"] / total, "quantized_params": stats.quantized_params,
                                 "total_params": total, "rel_sq_error": err, "quantize_s": round(qtime, 2),
                                 "pack_all_s": round(ptime, 2)})
                print(f"  done {scheme} search={search} {comp} ({ptime:.1f} s)", file=sys.stderr)

    best = min(r["bytes"] for r in rows)
    print(f"\n{'scheme':<6} {'search':<6} {'compr':<6} " + " ".join(f"{s + '/' + l:>15}" for l in LAYOUTS
                                                                   for s in STORAGES)
          + f" {'best B/qparam':>13} {'best B/param':>12} {'rel sq err':>10}")
    keyed: dict[tuple, dict] = {}
    for r in rows:
        keyed.setdefault((r["scheme"], r["clip_search"], r["compressor"]), {})[(r["storage"], r["layout"])] = r
    for (scheme, search, comp), cell in keyed.items():
        chosen = min(cell.values(), key=lambda r: (r["bytes"], not r["best_for_compressor"]))
        cols = []
        for l in LAYOUTS:
            for s in STORAGES:
                r = cell.get((s, l))
                cols.append(f"{'' if r is None else format(r['bytes'], ','):>15}")
        print(f"{scheme:<6} {'on' if search else 'off':<6} {comp:<6} " + " ".join(cols)
              + f" {chosen['bytes_per_quantized_param']:>13.4f} {chosen['bytes_per_param']:>12.4f}"
              f" {chosen['rel_sq_error']:>10.3e}")
    print(f"\nsmallest artifact: {best:,} bytes ('bytes' storage equals 'packed' when nothing is below 8 bits)")
    if args.out:
        Path(args.out).write_text(json.dumps({"source": desc, "total_params": total, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
