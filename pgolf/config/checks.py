"""Checking a config: every numeric key against its range (pgolf.config.ranges), the keys that
relate to each other, and each stage's choices. `pgolf train` and `pgolf export` check before
they start; a shipped train_gpt.py does not carry this module, since the recipe it runs was
checked when its run was configured and it lets its runner change only the run's identity and
data paths (pgolf.train.shipping.RUNNER_KEYS).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pgolf.compress.config import GPTQ_CALIBRATION
from pgolf.config import Config, ConfigError
from pgolf.config.ranges import NUMERIC_RULES, Range, export_switch_problems, per_group_problems, range_problems


def numeric_values(config: Config) -> dict[str, Any]:
    """section.key -> value of every int and float key (declared type; bools are not numbers)."""
    return {f"{s.name}.{k.name}": getattr(getattr(config, s.name), k.name)
            for s in dataclasses.fields(config) for k in dataclasses.fields(getattr(config, s.name))
            if str(k.type) in ("int", "float")}


def range_check(config: Config) -> list[str]:
    """Every numeric key against its range (pgolf.config.ranges); a float key without a rule
    still refuses NaN and infinities."""
    values = numeric_values(config)
    unruled = {key: value for key, value in values.items() if key not in NUMERIC_RULES}
    return range_problems(values, NUMERIC_RULES) + range_problems(unruled, {key: Range() for key in unruled})


def validate(config: Config) -> None:
    m, t = config.model, config.train
    # Ranges first: the checks below relate keys and assume each one is a sane number.
    problems = range_check(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    if m.model_dim % m.num_heads:
        problems.append(f"model.model_dim={m.model_dim} must be divisible by model.num_heads={m.num_heads}")
    elif (m.model_dim // m.num_heads) % 2:
        problems.append("model.model_dim / model.num_heads (the head size) must be even for rotary embeddings")
    if m.num_heads % m.num_kv_heads:
        problems.append(f"model.num_heads={m.num_heads} must be divisible by model.num_kv_heads={m.num_kv_heads}")
    if t.train_batch_tokens % (8 * t.train_seq_len):
        problems.append(
            f"train.train_batch_tokens={t.train_batch_tokens} must be a multiple of 8 x train.train_seq_len"
            f"={8 * t.train_seq_len} (it is split over 8 micro-batches: world size x gradient accumulation)"
        )
    if t.val_batch_size // 8 < t.train_seq_len:
        problems.append(
            f"train.val_batch_size={t.val_batch_size} must give every one of the 8 micro-batches at least one "
            f"sequence: set it to at least 8 x train.train_seq_len = {8 * t.train_seq_len}"
        )
    if not 0 <= t.eval_stride <= t.train_seq_len:
        problems.append(f"train.eval_stride must be within 0..train.train_seq_len={t.train_seq_len} "
                        f"(0: the standard evaluation), got {t.eval_stride}")
    if config.data.source not in ("shards", "synthetic"):
        problems.append(f"data.source must be 'shards' or 'synthetic', got '{config.data.source}'")
    elif config.data.source == "synthetic" and config.data.tokenizer_path not in ("byte260", "byte"):
        problems.append(
            f"data.source=synthetic is a byte-level corpus and needs data.tokenizer_path=byte260, not "
            f"'{config.data.tokenizer_path}'; for shards made with that tokenizer set data.source=shards"
        )
    # Imported here, not at the top: pgolf.config stays cheap and torch-free to import (pgolf config,
    # pgolf submit); checking a config asks the stages that own the choices.
    from pgolf.compress.container import COMPRESSOR_CHOICES, ArtifactError, check_compressor

    if config.export.compressor not in COMPRESSOR_CHOICES:
        problems.append(f"export.compressor must be one of {', '.join(COMPRESSOR_CHOICES)}, "
                        f"got '{config.export.compressor}'")
    elif config.export.compressor != "auto":
        try:
            check_compressor(config.export.compressor)
        except ArtifactError as exc:
            problems.append(str(exc))
    e = config.export
    from pgolf.compress.quant import CLIP_RULES, CONTROLS, SCHEMES, policy_bits

    if e.scheme not in SCHEMES:
        problems.append(f"export.scheme must be one of {', '.join(SCHEMES)}, got '{e.scheme}'")
    try:
        policy_bits(e.policy)
    except ValueError as exc:
        problems.append(f"export.policy: {exc}")
    for key, options in (("clip_search", ("auto", "on", "off")), ("storage", ("auto", "packed", "bytes")),
                         ("layout", ("auto", "plain", "grouped", "per_group")), ("clip_rule", CLIP_RULES),
                         ("controls", CONTROLS),
                         ("gptq_calibration", GPTQ_CALIBRATION)):
        if getattr(e, key) not in options:
            problems.append(f"export.{key} must be one of {', '.join(options)}, got '{getattr(e, key)}'")
    problems.extend(per_group_problems(e))
    problems.extend(export_switch_problems(config))
    if e.gptq_reserve_seconds > 0 and not (e.gptq or e.allocate):
        problems.append("export.gptq_reserve_seconds reserves time for the calibration of GPTQ or the allocator: "
                        "set export.gptq=true (or export.allocate=true) too")
    if e.gptq_reserve_seconds >= max(t.max_wallclock_seconds, 0) > 0:
        problems.append("export.gptq_reserve_seconds must be smaller than train.max_wallclock_seconds")
    q = config.qat
    if q.mode not in ("ste", "noise"):
        problems.append(f"qat.mode must be 'ste' or 'noise', got '{q.mode}'")
    from pgolf.model.gpt import model_config_problems

    problems.extend(model_config_problems(m))
    if t.device not in ("auto", "cpu", "cuda"):
        problems.append("train.device must be auto, cpu or cuda")
    if t.compile not in ("auto", "on", "off"):
        problems.append("train.compile must be auto, on or off")
    switches = (("train.fused_loss", t.fused_loss), ("optim.batched_ns", config.optim.batched_ns),
                ("optim.parallel_muon", config.optim.parallel_muon), ("data.prefetch", config.data.prefetch),
                ("data.byte_sidecar", config.data.byte_sidecar))
    problems += [f"{key} must be auto, on or off, got '{value}'" for key, value in switches
                 if value not in ("auto", "on", "off")]
    if config.data.packed_row and not m.doc_mask:
        problems.append("data.packed_row=true makes each micro-batch one row; without model.doc_mask its attention "
                        "would span the whole micro-batch: set model.doc_mask=true (and model.max_span)")
    if config.data.caseops and config.data.byte_sidecar == "off":
        problems.append("data.caseops=true scores the original text's bytes from the byte sidecar: "
                        "data.byte_sidecar must be auto or on")
    if t.sdpa_backend not in ("auto", "flash", "cudnn", "efficient", "math"):
        problems.append(f"train.sdpa_backend must be auto, flash, cudnn, efficient or math, got '{t.sdpa_backend}'")
    if config.optim.muon_ns not in ("classic", "polar_express"):
        problems.append(f"optim.muon_ns must be classic or polar_express, got '{config.optim.muon_ns}'")
    if t.grad_clip_mode not in ("synced", "per_rank"):
        problems.append(f"train.grad_clip_mode must be synced or per_rank, got '{t.grad_clip_mode}'")
    if config.optim.parallel_muon_bf16 and config.optim.parallel_muon == "off":
        problems.append("optim.parallel_muon_bf16=true needs optim.parallel_muon=auto or on")
    if config.ema.enabled and config.swa.enabled:
        problems.append("ema.enabled and swa.enabled both replace the weights at the end of training: switch one off")
    for section in dataclasses.fields(config):  # sections that check themselves (techniques)
        check = getattr(getattr(config, section.name), "problems", None)
        if check is not None:
            problems.extend(check())
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


