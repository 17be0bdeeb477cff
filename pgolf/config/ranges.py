"""The valid range of every numeric config key, as one table (NUMERIC_RULES), and the Range
rule that checks a value and says what it must be. Torch-free: configs load without torch.

Every int and float key of every section needs a rule here (tests/config/test_ranges.py fails
for a key without one); a non-finite float is refused for every float key whatever its range.
Checks that relate two keys (train.eval_stride <= train.train_seq_len, ...) stay in validate().
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """low <= value (< low when low_open) and value <= high (< high when high_open); None: unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""  # what the boundary values mean, e.g. "0: off"
    named: str = ""  # a word for the range, e.g. "positive": "must be positive (>= 1)"

    def describe(self) -> str:
        """The valid range in words: "within [0, 1)", "within 2..8", ">= 0", "positive (> 0)"."""
        bounds = self._bounds()
        return f"{self.named} ({bounds})" if self.named else bounds

    def _bounds(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if isinstance(self.low, int) and isinstance(self.high, int) and not (self.low_open or self.high_open):
            return f"within {_number(self.low)}..{_number(self.high)}"
        return (f"within {'(' if self.low_open else '['}{_number(self.low)}, "
                f"{_number(self.high)}{')' if self.high_open else ']'}")

    def problem(self, name: str, value: Any) -> str | None:
        """None when value is in range, else the message: the name, the valid range, the value."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} must be a number, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            bounded = self.low is not None or self.high is not None
            return f"{name} must be a finite number{', ' + self.describe() if bounded else ''}, got {value}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not (too_low or too_high):
            return None
        return f"{name} must be {self.describe()}, got {value}" + (f" ({self.note})" if self.note else "")


def _number(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def at_least(low: float, note: str = "") -> Range:
    return Range(low=low, note=note)


def positive(note: str = "") -> Range:
    """> 0 for a float (0 itself is meaningless)."""
    return Range(low=0.0, low_open=True, note=note, named="positive")


COUNT = Range(low=1, named="positive")  # a size or count where 0 means nothing
FRACTION = Range(0.0, 1.0)  # [0, 1]
MOMENTUM = Range(0.0, 1.0, high_open=True)  # [0, 1): 1 would never forget, as Adam's betas
LEARNING_RATE = at_least(0.0, "0 freezes the group")
# numpy's legacy seeding (np.random.seed, used by seed_everything) takes 0 .. 2**32 - 1
SEED = Range(0, 2**32 - 1)

NUMERIC_RULES: dict[str, Range] = {
    # [model]
    "model.vocab_size": COUNT,
    "model.num_layers": COUNT,
    "model.model_dim": COUNT,
    "model.num_heads": COUNT,
    "model.num_kv_heads": COUNT,
    "model.mlp_mult": COUNT,
    "model.tied_embed_init_std": at_least(0.0),
    "model.logit_softcap": positive(),
    "model.rope_base": positive("the base of the rotary frequencies, 10000 officially"),
    "model.qk_gain_init": at_least(0.0),
    "model.mlp_slope": FRACTION,
    "model.mlp_hidden": at_least(0, "0: from model.mlp_mult, or 8/3 x model_dim when gated"),
    "model.recurrence": at_least(1, "1: every block runs once"),
    "model.cycle_stem": at_least(0, "all cycle_* 0: no middle cycle"),
    "model.cycle_core": at_least(0, "all cycle_* 0: no middle cycle"),
    "model.cycle_repeats": at_least(0, "all cycle_* 0: no middle cycle"),
    "model.cycle_tail": at_least(0, "all cycle_* 0: no middle cycle"),
    "model.bigram_buckets": at_least(2, "one bucket is each row's first position, the rest are hashed"),
    "model.bigram_dim": COUNT,
    "model.ve_dim": COUNT,
    "model.rope_dims": at_least(0, "0: every dim of the head"),
    "model.rope_ref_len": at_least(0, "0: off"),
    "model.parallel_from": at_least(-1, "-1: off"),
    "model.attn_gate_dims": at_least(0, "0: off"),
    "model.attn_gate_scale": positive(),
    "model.smear_dims": COUNT,
    "model.bos_id": at_least(0),
    "model.max_span": at_least(0, "0: no cap"),
    "model.loop_start": at_least(0),
    "model.loop_end": at_least(0),
    "model.loop_passes": COUNT,
    "model.loop_start_frac": Range(0.0, 1.0, note="0: loops from the first step"),
    # [data]
    "data.synthetic_train_tokens": at_least(2),
    "data.synthetic_val_tokens": at_least(2),
    "data.synthetic_seed": at_least(0),
    # [train]
    "train.seed": SEED,
    "train.iterations": COUNT,
    "train.warmdown_iters": at_least(0, "0: no warmdown"),
    "train.warmdown_frac": FRACTION,
    "train.min_lr": FRACTION,
    "train.warmup_steps": at_least(0, "0: no compile warmup"),
    "train.train_batch_tokens": COUNT,
    "train.train_seq_len": COUNT,
    "train.max_wallclock_seconds": at_least(0.0, "0: no wall-clock cap"),
    "train.val_batch_size": COUNT,
    "train.val_loss_every": at_least(0, "0: only at the end"),
    "train.val_max_tokens": at_least(0, "0: the whole validation split"),
    "train.eval_stride": at_least(0, "0: train_seq_len, the standard evaluation"),
    "train.train_log_every": at_least(0, "0: no periodic train-loss lines"),
    "train.grad_clip_norm": at_least(0.0, "0: no clipping"),
    "train.checkpoint_every": at_least(0, "0: no checkpoints"),
    "train.weight_check_every": at_least(0, "0: only at validation, checkpoints and the end"),
    "train.stall_check_steps": at_least(0, "0: no stall check"),
    "train.stall_min_drop": at_least(0.0),
    "train.progress_every_seconds": at_least(0.0, "0: no progress lines off a terminal"),
    "train.keep_checkpoints": at_least(0, "0: keep every checkpoint"),
    # [optim]
    "optim.embed_lr": LEARNING_RATE,
    "optim.head_lr": LEARNING_RATE,
    "optim.tied_embed_lr": LEARNING_RATE,
    "optim.matrix_lr": LEARNING_RATE,
    "optim.scalar_lr": LEARNING_RATE,
    "optim.muon_momentum": MOMENTUM,
    "optim.muon_backend_steps": at_least(1, "Newton-Schulz iterations; 0 would not orthogonalise"),
    "optim.muon_momentum_warmup_start": MOMENTUM,
    "optim.muon_momentum_warmup_steps": at_least(0, "0: no momentum warmup"),
    "optim.beta1": MOMENTUM,
    "optim.beta2": MOMENTUM,
    "optim.adam_eps": positive(),
    "optim.muon_wd": at_least(0.0, "0 turns weight decay off"),
    "optim.adam_wd": at_least(0.0, "0 turns weight decay off"),
    "optim.embed_wd": at_least(-1.0, "-1: the same as optim.adam_wd"),
    # [qat]
    "qat.start_frac": Range(0.0, 1.0, high_open=True),
    "qat.bits": Range(2, 8),
    # [ema]
    "ema.decay": Range(0.0, 1.0, low_open=True, high_open=True),
    # [swa]
    "swa.every": COUNT,
    "swa.start_scale": positive("collect while the lr multiplier is below it; > 1: from the first step"),
    # [export]
    "export.gptq_seqs": COUNT,
    "export.gptq_block": COUNT,
    "export.gptq_damp": at_least(0.0, "the fraction of the mean Hessian diagonal added, 0.01 usually"),
    "export.gptq_reserve_seconds": at_least(0.0, "0: none, or measured for export.gptq_calibration=train_reserved"),
    "export.allocate_budget": at_least(0, "0: 16,000,000 minus the code bytes"),
    "export.sdclip_k_mlp": positive("the clip in standard deviations of the row, 11.5 in PR #1855"),
    "export.sdclip_k_attn": positive("the clip in standard deviations of the row, 13.0 in PR #1855"),
    "export.sdclip_k_embed": positive("the clip in standard deviations of the row, 14.0 in PR #1855"),
    "export.sdclip_k_other": positive("the clip in standard deviations of the row"),
    "export.lqer_rank": at_least(0, "0: no LQER correction; PR #1855 uses 4"),
    "export.lqer_top": COUNT,
    "export.lqer_a_bits": Range(2, 8, note="PR #1855 stores A as int2"),
    "export.lqer_b_bits": Range(2, 8, note="PR #1855 stores B as int4"),
    "export.lqer_b_group": COUNT,
    # [run]
    "run.threads": at_least(0, "0: auto, the cores divided among the pgolf runs training on this host"),
}


def export_switch_problems(config: Any) -> list[str]:
    """PR #1855's export switches that would do nothing in this config, each naming what to set."""
    e, m, problems = config.export, config.model, []
    if e.gptq_embedding and not (e.gptq or e.allocate):
        problems.append("export.gptq_embedding=true gives GPTQ (and the allocator) the tied embedding's Hessian: "
                        "set export.gptq=true (or export.allocate=true) too")
    elif e.gptq_embedding and not m.tie_embeddings:
        problems.append("export.gptq_embedding=true takes the tied embedding's Hessian from the head's input: set "
                        "model.tie_embeddings=true, or leave export.gptq_embedding off (an untied head has its own)")
    if e.attn_gate_int8 and m.attn_gate_dims == 0:
        problems.append("export.attn_gate_int8=true stores the attention output gates as int8 and there are none: "
                        "set model.attn_gate_dims (12 in PR #1855), or leave export.attn_gate_int8 off")
    return problems


def per_group_problems(export: Any) -> list[str]:
    """What is wrong with the per-group compression keys of an [export] section (export.layout=per_group,
    row_order, group_backend); a backend that is not installed is named with what to install."""
    e = export
    if e.layout != "per_group":
        return [f"export.{key} applies to export.layout=per_group only: set that too, or leave export.{key} at "
                f"{default!r}" for key, default in (("row_order", []), ("group_backend", "brotli"))
                if getattr(e, key) != default]
    # torch and the optional module: only for a per_group config (pgolf.train.shipping ships it then)
    from pgolf.compress.container import ArtifactError, check_compressor
    from pgolf.compress.grouping import GroupError, check_options

    try:
        check_options(e.storage, e.row_order, e.group_backend, check_compressor)
    except (GroupError, ArtifactError) as exc:
        return [f"export.layout=per_group: {exc}"]
    return []


def range_problems(values: dict[str, Any], rules: dict[str, Range]) -> list[str]:
    """The message of every value outside its rule's range; values maps key -> value."""
    return [p for key, value in values.items() if key in rules
            for p in [rules[key].problem(key, value)] if p is not None]
