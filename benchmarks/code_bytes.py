"""Counted code bytes per preset: the length of the train_gpt.py `pgolf submit` would write for
each configs/*.toml, packed with brotli-11 and with lzma (both minified, base85).

    python benchmarks/code_bytes.py

Prints a markdown table (docs/BENCHMARKS.md, "Code bytes per preset").
"""

from __future__ import annotations

import sys
from pathlib import Path

from pgolf.config.resolve import resolve_config
from pgolf.train.bundle import bundle_modules, code_bytes_for, default_compressor

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def main() -> int:
    compressors = ["lzma"] + (["brotli"] if default_compressor() == "brotli" else [])
    print("| preset | modules | " + " | ".join(f"{c} + base85" for c in compressors) + " |")
    print("|---|---:|" + "---:|" * len(compressors))
    for path in sorted(CONFIG_DIR.glob("*.toml")):
        cfg, _ = resolve_config(str(path), [], env={})
        sizes = [f"{code_bytes_for(cfg, c)[0]:,}" for c in compressors]
        print(f"| {path.stem} | {len(bundle_modules(cfg))} | " + " | ".join(sizes) + " |")
    if len(compressors) == 1:
        print("(brotli is not installed: pip install brotli for the brotli column)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
