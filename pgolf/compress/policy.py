"""From trained weights to the quantized tensors the artifact stores, as the export config asks.

Order: bit widths (scheme default, then the policy, or the allocator within a byte budget),
then per-row quantization (clip search or SDClip for intN), then optionally GPTQ in place of plain
rounding for every 2-D tensor it has a Hessian for, then optionally LQER corrections of the
worst-quantized matrices (export.lqer_rank). Hessians come from activations of
training-data batches only, or of text the model samples (export.gptq_calibration); their
collection is timed so the run can charge it to the wall-clock budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pgolf.compress.config import ExportConfig
from pgolf.model.roles import Role, component_of, export_treatment, param_roles
from pgolf.compress.quant import (KEEP_FLOAT_MAX_NUMEL, SCHEMES, QuantizedTensor, QuantStats, policy_bits,
                                  quantize_state_dict, sdclip_group)
from pgolf.model.attention import CausalSelfAttention
from pgolf.rules import SIZE_CAP_BYTES

CLIP_SEARCH = {"auto": None, "on": True, "off": False}


@dataclass
class ExportPlan:
    qdict: dict[str, QuantizedTensor]
    stats: QuantStats
    seconds: float = 0.0  # calibration + allocation + GPTQ
    lines: list[str] = field(default_factory=list)  # what was chosen, for the log
    calibration_seconds: float = 0.0  # the part of seconds the calibration took (gptq.calibrate)


def _large_matrices(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in state.items() if t.is_floating_point() and t.ndim == 2 and t.numel() > KEEP_FLOAT_MAX_NUMEL}


FP16_EMBEDDING_RULE = [r"^tok_emb\.weight$", "fp16"]


def effective_policy(e: ExportConfig) -> list:
    """export.policy with the rules its switches add in front (export.fp16_embedding)."""
    return ([FP16_EMBEDDING_RULE] if e.fp16_embedding else []) + list(e.policy)


def plan_export(model: torch.nn.Module, cfg, train_files: list[Path], device: torch.device,
                code_bytes: int) -> ExportPlan:
    """Quantize model's weights as cfg (a run's pgolf.config.Config: its export section, and the
    sequence length and vocabulary calibration batches need) asks."""
    e = cfg.export
    start = time.perf_counter()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    lines: list[str] = []
    policy = effective_policy(e)
    bits_for = policy_bits(policy) if policy else None
    hessians, calibration_s = None, 0.0
    if e.gptq or e.allocate:
        from pgolf.compress.gptq import calibrate

        hessians, calibration_s, line = calibrate(model, cfg, train_files, device)
        lines.append(line)
    roles = export_treatment(model)
    if e.allocate:
        bits_for = _allocate(state, cfg, hessians, bits_for, code_bytes, lines, roles)
    if e.attn_gate_int8:
        roles.update(dict.fromkeys(attention_gate_names(model), "int8_row"))
    qdict, stats = quantize_state_dict(state, scheme=e.scheme, bits_for=bits_for, clip_search=CLIP_SEARCH[e.clip_search],
                                       roles=roles, clip_rule=e.clip_rule, controls=e.controls,
                                       sdclip_k=sdclip_k_of(model, e) if e.clip_rule == "sdclip" else None)
    if e.gptq:
        _apply_gptq(state, qdict, hessians, cfg, lines)
    if e.lqer_rank > 0:
        from pgolf.compress.lqer import add_lqer

        result = add_lqer(state, qdict, e.lqer_rank, e.lqer_top, e.lqer_a_bits, e.lqer_b_bits, e.lqer_b_group)
        qdict = result.qdict
        lines.extend(result.lines())
    return ExportPlan(qdict, stats, time.perf_counter() - start, lines, calibration_s)


def attention_gate_names(model: torch.nn.Module) -> list[str]:
    """The state-dict names of the attention output gates (model.attn_gate_dims)."""
    return [f"{prefix}.gate" for prefix, m in model.named_modules()
            if isinstance(m, CausalSelfAttention) and getattr(m, "gate", None) is not None]


def sdclip_k_of(model: torch.nn.Module, e: ExportConfig):
    """SDClip's k of each tensor, by role: the embedding (or an untied head) export.sdclip_k_embed, a
    matrix of the attention or MLP slot sdclip_k_attn / sdclip_k_mlp, anything else sdclip_k_other;
    a tensor without a role by its name (quant.sdclip_group)."""
    by_group = {"embed": e.sdclip_k_embed, "attn": e.sdclip_k_attn, "mlp": e.sdclip_k_mlp, "other": e.sdclip_k_other}
    roles = param_roles(model)
    components = {"attention": "attn", "mlp": "mlp"}

    def k_of(name: str) -> float:
        role = roles.get(name)
        if role is None:
            return by_group[sdclip_group(name)]
        if role in (Role.EMBEDDING, Role.HEAD):
            return by_group["embed"]
        return by_group[components.get(component_of(model, name), "other") if role is Role.MATRIX else "other"]

    return k_of


def _allocate(state, cfg, hessians, policy, code_bytes: int, lines: list[str], roles: dict[str, str]):
    from pgolf.compress.allocate import allocate_bits

    matrices = _large_matrices(state)
    default = SCHEMES[cfg.export.scheme]
    # Tensors the policy pins, or that have no Hessian (the tied embedding, unless
    # export.gptq_embedding: int8 under any scheme, as quantize_state_dict's roles say), are not allocated.
    fixed = {}
    for name in matrices:
        spec = policy(name, matrices[name]) if policy is not None else None
        if spec is not None or name not in hessians:
            fixed[name] = spec if spec is not None else 8 if roles.get(name) == "int8" else default
    others = sum(t.numel() * 4 for n, t in state.items() if n not in matrices)  # small tensors, fp32 at most
    budget = cfg.export.allocate_budget or (SIZE_CAP_BYTES - code_bytes - others)
    allocation = allocate_bits(matrices, budget, hessian_diag={n: h.diagonal() for n, h in hessians.items()
                                                                 if n in matrices and n not in fixed},
                               fixed=fixed)
    lines.extend(allocation.lines())

    def bits_for(name: str, tensor=None):
        return allocation.bits.get(name)

    return bits_for


def _apply_gptq(state, qdict: dict[str, QuantizedTensor], hessians, cfg, lines: list[str]) -> None:
    """Replace plain rounding by GPTQ for every per-row integer tensor with a Hessian."""
    from pgolf.compress.gptq import gptq_state_dict

    def bits_for(name: str):
        qt = qdict.get(name)
        if qt is None or name not in hessians or qt.kind not in ("int_per_row", "int8_per_row"):
            return None
        return qt.bits

    e = cfg.export
    # PR #549's clip rule chooses per tensor and SDClip's scales are the rule itself (from the
    # unquantized weights, as BEST:2162), so GPTQ keeps the scales they chose
    scales = ({n: qt.scale for n, qt in qdict.items() if qt.kind == "int_per_row"}
              if e.clip_rule in ("percentile", "sdclip") else None)
    result = gptq_state_dict(state, hessians, bits_for, block_size=e.gptq_block, damp=e.gptq_damp,
                             act_order=e.gptq_act_order, clip_search=e.clip_search != "off", scales=scales)
    for name, (q, scale, bits) in result.tensors.items():
        qdict[name] = QuantizedTensor("int_per_row", q.reshape(state[name].shape).contiguous(), scale.contiguous(),
                                      qdict[name].orig_dtype, bits)
    lines.append(f"gptq: {len(result.tensors)} tensors in {result.seconds:.1f} s")
