"""Record (or check) the golden baseline: the official-baseline model's initial state dict,
its forward on fixed tokens, and a 5-step CPU training run on the FineWeb sample.

Recorded once before the package redesign; tests/test_golden_baseline.py keeps every later
change bit-identical to it. Run `python tests/golden/record_baseline.py --write` only when a
change of results is intended and explained in the commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from pgolf.compress.container import read_artifact
from pgolf.config import Config
from pgolf.config.resolve import resolve_config
from pgolf.model.gpt import GPT
from pgolf.compress.quant import dequantize_state_dict
from pgolf.runs import read_metrics
from pgolf.train.run import run_training

GOLDEN = Path(__file__).with_name("baseline.json")
SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fineweb_sp1024_sample"
# The baseline preset at full width and depth, on short sequences so 5 CPU steps take seconds.
RUN_OVERRIDES = ["train.iterations=5", "train.train_batch_tokens=1024", "train.train_seq_len=128",
                 "train.val_batch_size=8192", "train.val_max_tokens=4096", "train.max_wallclock_seconds=0",
                 "train.warmup_steps=2", "train.val_loss_every=0", "train.train_log_every=1",
                 "train.warmdown_iters=3"]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def measure(runs_dir: Path) -> dict:
    torch.manual_seed(1337)
    model = GPT(Config().model)
    init = state_digest(model.state_dict())
    tokens = torch.randint(0, 1024, (2, 65), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model.logits(tokens[:, :-1])
        loss = model(tokens[:, :-1], tokens[:, 1:])
    cfg, _ = resolve_config("baseline", [f"data.data_path={SAMPLE}", f"data.tokenizer_path={SAMPLE / 'fineweb_1024_bpe.model'}",
                                         f"run.runs_dir={runs_dir}", "run.run_id=golden", *RUN_OVERRIDES], env={})
    summary = run_training(cfg, console=False)
    run_dir = runs_dir / summary["run_id"]
    losses = [e["train_loss"] for e in read_metrics(run_dir) if e["event"] == "train"]
    final = torch.load(sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1], map_location="cpu", weights_only=False)
    return {
        "init_state_sha256": init,
        "forward_logits_sha256": state_digest({"logits": logits}),
        "forward_loss": loss.item().hex(),
        "train_losses": [float(x).hex() for x in losses],
        "final_state_sha256": state_digest(final["model"]),
        "pre_quant_val_bpb": float(summary["pre_quant"]["val_bpb"]).hex(),
        "roundtrip_val_bpb": float(summary["roundtrip"]["val_bpb"]).hex(),
        # The artifact's tensors, not its length: its metadata carries the config, which gains sections.
        "artifact_state_sha256": state_digest(dequantize_state_dict(read_artifact(run_dir / "model.pgolf")[0])),
    }


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp))
    print(json.dumps(result, indent=2))
    if "--write" in sys.argv:
        GOLDEN.write_text(json.dumps(result, indent=2) + "\n")
