"""Artifact bytes of one quantized state dict under pgolf's container layouts, next to the
per-group compression of PR #1855 (export.layout=per_group): codes grouped by role across layers,
2-D codes transposed, each group compressed alone; with and without greedy nearest-L1 row
order on the record's groups (tok_emb, blocks.*.attn.c_q, blocks.*.mlp.fc); lrzip (ZPAQ) as the
group backend too when the lrzip binary is on PATH.

    python benchmarks/per_group_compression.py                         # random normal, #1855 shapes
    python benchmarks/per_group_compression.py --layers 3              # fewer blocks, same shapes
    python benchmarks/per_group_compression.py --checkpoint runs/<id>/checkpoints/step_N.pt
    python benchmarks/per_group_compression.py --variants plain:brotli,per_group:brotli --out r.json

Inputs: ``--random`` (default) draws N(0, 0.02) weights at #1855's shapes (tied 8192x512 embedding
as int7 per row, as the pr1855 preset's policy; per block c_q 512x512, c_k and c_v 256x512,
attn.proj 512x512, mlp.fc 2048x512, mlp.proj 512x2048 as int6 per row, clip search on) -- random
rows have no neighbours to find, so this measures the cost side of row order. ``--checkpoint``
quantizes a pgolf checkpoint's model the same way, every 2-D float tensor of at least 4,096
elements per row (int7 for tok_emb, int6 otherwise), the rest by the export's rules (fp16
controls). The artifacts carry no meta, so the numbers are the weights alone.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from pgolf.compress.container import available_compressors, describe_artifact, pack_artifact, unpack_artifact
from pgolf.compress.grouping import greedy_l1_order, role_group
from pgolf.compress.quant import policy_bits, quantize_state_dict
from pgolf.compress.quantizers.rows import quantize_int_per_row

RECORD_ROW_ORDER = ["tok_emb", "blocks.*.attn.c_q", "blocks.*.mlp.fc"]  # #1855's reordered groups
# "layout:compressor[:reorder]"; per_group's compressor is the group backend, the rest is brotli
DEFAULT_VARIANTS = ("plain:lzma", "plain:brotli", "grouped:brotli", "per_group:brotli", "per_group:brotli:reorder",
                    "per_group:lrzip", "per_group:lrzip:reorder")
BLOCK_SHAPES = {"attn.c_q": (512, 512), "attn.c_k": (256, 512), "attn.c_v": (256, 512), "attn.proj": (512, 512),
                "mlp.fc": (2048, 512), "mlp.proj": (512, 2048)}


def random_state(layers: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"tok_emb.weight": torch.randn(8192, 512, generator=g) * 0.02}
    for i in range(layers):
        for name, shape in BLOCK_SHAPES.items():
            state[f"blocks.{i}.{name}.weight"] = torch.randn(*shape, generator=g) * 0.02
    return state


def checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SystemExit(f"{path} holds no state dict (expected a dict of tensors or a checkpoint with 'model')")
    return sd


def quantize(state: dict[str, torch.Tensor]) -> dict:
    qdict, _ = quantize_state_dict(state, scheme="int6", bits_for=policy_bits([["tok_emb", 7]]), controls="fp16")
    for name, t in state.items():  # matrices the size rule left float: per row too
        if t.is_floating_point() and t.ndim == 2 and t.numel() >= 4096 and qdict[name].kind == "float":
            qdict[name] = quantize_int_per_row(t.float(), 7 if name.startswith("tok_emb") else 6)
    return qdict


def run_variant(qdict, variant: str) -> dict:
    layout, codec, *rest = variant.split(":")
    reorder = rest == ["reorder"]
    kwargs = ({"compressor": "brotli", "layout": "per_group", "group_backend": codec, "storage": "bytes",
               "row_order": [g for g in RECORD_ROW_ORDER if any(role_group(n) == g for n in qdict)] if reorder else []}
              if layout == "per_group" else {"compressor": codec, "layout": layout, "storage": "bytes"})
    start = time.perf_counter()
    blob = pack_artifact(qdict, {}, **kwargs)
    seconds = time.perf_counter() - start
    loaded, _ = unpack_artifact(blob)  # exact round trip, or the benchmark stops
    for name, qt in qdict.items():
        if not torch.equal(loaded[name].data, qt.data):
            raise SystemExit(f"{variant}: {name} did not round-trip")
    info = describe_artifact(blob)
    streams = {s["groups"][0] if len(s["groups"]) == 1 else "rest": s["stored_bytes"]
               for s in info.get("streams", []) if s["groups"] != ["crc32"]}
    return {"variant": variant, "bytes": len(blob), "seconds": round(seconds, 1), "streams": streams}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="a pgolf checkpoint (or state dict) instead of random weights")
    ap.add_argument("--layers", type=int, default=11, help="blocks of random weights (default 11, as #1855)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help="comma-separated layout:compressor[:reorder] (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="also write the results as JSON")
    args = ap.parse_args(argv)

    state = checkpoint_state(args.checkpoint) if args.checkpoint else random_state(args.layers, args.seed)
    source = (f"checkpoint {args.checkpoint}" if args.checkpoint
              else f"random N(0, 0.02) at #1855 shapes, {args.layers} blocks, seed {args.seed}")
    start = time.perf_counter()
    qdict = quantize(state)
    params = sum(qt.data.numel() for qt in qdict.values())
    print(f"# {source}: {params:,} stored values, quantized in {time.perf_counter() - start:.1f} s; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    # the row order's own cost, per tensor shape of the reordered groups
    order_times: dict[str, float] = {}
    for name, qt in qdict.items():
        shape = "x".join(map(str, qt.data.shape))
        if role_group(name) in RECORD_ROW_ORDER and qt.data.ndim == 2 and shape not in order_times:
            t0 = time.perf_counter()
            greedy_l1_order(qt.data)
            order_times[shape] = round(time.perf_counter() - t0, 2)
    print(f"# greedy L1 row order, seconds per tensor: {order_times}", flush=True)

    have = set(available_compressors()) | ({"lrzip"} if shutil.which("lrzip") else set())
    results = []
    for variant in args.variants.split(","):
        needed = {variant.split(":")[1]} | ({"brotli"} if variant.startswith("per_group") else set())
        if not needed <= have:
            print(f"{variant:28s} skipped ({', '.join(sorted(needed - have))} not available)", flush=True)
            continue
        r = run_variant(qdict, variant)
        results.append(r)
        print(f"{variant:28s} {r['bytes']:>12,} bytes  {r['seconds']:7.1f} s", flush=True)
    if results:
        base = results[0]["bytes"]
        print(f"\n| variant | bytes | vs {results[0]['variant']} | pack s |\n|---|---:|---:|---:|")
        for r in results:
            print(f"| {r['variant']} | {r['bytes']:,} | {100 * (r['bytes'] / base - 1):+.2f} % | {r['seconds']} |")
        per_group = [r for r in results if r["streams"]]
        if per_group:
            groups = list(dict.fromkeys(g for r in per_group for g in r["streams"]))
            print("\n| stream | " + " | ".join(r["variant"] for r in per_group) + " |")
            print("|---|" + "---:|" * len(per_group))
            for g in groups:
                print(f"| {g} | " + " | ".join(f"{r['streams'].get(g, 0):,}" for r in per_group) + " |")
    if args.out:
        args.out.write_text(json.dumps({"source": source, "params": params, "order_seconds": order_times,
                                        "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
