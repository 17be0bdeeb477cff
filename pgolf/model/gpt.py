"""The GPT, readable top to bottom: a fixed skeleton whose parts are chosen by config.

    token embedding -> embedding add-ons (model.embed) -> RMS norm -> post-norm add-ons (model.post_norm) = x0
    -> the blocks, in the order the layout gives (model.layout; U-Net skips)
       each block: mix with x0, attention (model.attention, its position model.position), mlp (model.mlp)
    -> RMS norm -> output head (tied with the embedding by default) -> tanh logit softcap

The defaults are the official Parameter Golf baseline, bit for bit: 9 x 512, GQA 8/4 heads with
RoPE and RMS-normed Q/K (learnable per-head gain), a relu^2 MLP, U-Net skips, tied embeddings,
softcap 30. The slots and their protocols are in pgolf.model.registry; every parameter carries
a role (pgolf.model.roles) that decides its optimizer, dtype and export. Off by default, the
records' switches: model.ln_scale (deeper blocks read smaller inputs), model.init=orthogonal,
model.skip_gates (each skip lerps in by a learned gate), model.parallel_from (two residual lanes
in the last blocks) and the `looping` flag of model.layout=loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.config import ModelConfig
from pgolf.model.layers import CastedLinear, rms_norm
from pgolf.model.layout import block_schedule, layout_problems
from pgolf.model.mlp import mlp_problems
from pgolf.model.registry import ATTENTIONS, EMBEDDING_ADDONS, MLPS, POST_NORM_ADDONS, SLOTS, STREAM_ADDONS
from pgolf.model.roles import ROLE_TABLE, Role, param_roles, tag

# Every module holding registry entries is imported here, statically: importing registers its
# entries, and import statements are what the submission bundler follows (pgolf.model.registry).
# The names are re-exported too, for the import paths other modules use.
from pgolf.model.attention import CausalSelfAttention, Rotary, apply_rotary  # noqa: F401  "gqa", "rope"
from pgolf.model.attention import DOC_MASK, attention_problems, document_mask
from pgolf.model.embed import embed_problems  # "bigram", "smear", "smear_bos", "value_embed"
from pgolf.model.layout import BlockSchedule, cycle_enabled  # noqa: F401  "unet", "recurrence", "middle_cycle", "loop"
from pgolf.model.mlp import MLP, MLP_VARIANTS, MLPVariant, gated_hidden_size, mlp_hidden_size  # noqa: F401

__all__ = ["GPT", "Block", "build_model", "count_parameters", "model_config_problems", "CastedLinear", "rms_norm",
           "CausalSelfAttention", "Rotary", "apply_rotary", "BlockSchedule", "block_schedule", "cycle_enabled",
           "MLP", "MLP_VARIANTS", "MLPVariant", "gated_hidden_size", "mlp_hidden_size"]


INITS = ("default", "orthogonal")  # model.init


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        dim = cfg.model_dim
        self.attn = ATTENTIONS.build(cfg.attention, cfg, layer)
        self.mlp = MLPS.build(cfg.mlp, cfg, layer)
        # Per-channel gains on each branch, and how much of the embedding stream x0 to mix back in
        # (row 0 weighs the residual stream, row 1 x0): cheap, and let depth be used selectively.
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())
        tag(self, Role.CONTROL, "attn_scale", "mlp_scale", "resid_mix")
        self.ln_scale = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0

    def norm(self, x: Tensor) -> Tensor:
        x = rms_norm(x)
        return x if self.ln_scale == 1.0 else x * self.ln_scale

    def forward(self, x: Tensor, x0: Tensor, extras: dict[str, Tensor] | None = None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.norm(x), extras)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.norm(x))

    def parallel(self, a: Tensor, m: Tensor, x0: Tensor, extras, resid: Tensor, post: Tensor) -> tuple[Tensor, Tensor]:
        """#1855's two lanes: attention reads lane a (mixed with x0), the MLP reads lane m, both
        from the lanes as they were; each lane keeps resid[k] of itself plus post[0, k] of the
        attention's output and post[1, k] of the MLP's."""
        mix, resid, post = self.resid_mix.to(a.dtype), resid.to(a.dtype), post.to(a.dtype)
        att = self.attn_scale.to(a.dtype) * self.attn(self.norm(mix[0] * a + mix[1] * x0), extras)
        mlp = self.mlp_scale.to(a.dtype) * self.mlp(self.norm(m))
        return resid[0] * a + post[0, 0] * att + post[1, 0] * mlp, resid[1] * m + post[0, 1] * att + post[1, 1] * mlp


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.schedule = block_schedule(cfg)
        self.looping = True  # layout loop: off runs schedule.unlooped (pgolf.train.looping turns it off early)
        self.unique_depth = cfg.num_layers  # distinct blocks (parameters)
        self.effective_depth = self.schedule.effective_depth  # blocks run per forward pass
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        tag(self.tok_emb, Role.EMBEDDING, "weight")
        self.num_encoder_layers = len(self.schedule.encoder)
        self.num_decoder_layers = len(self.schedule.decoder)
        self.skip_weights = nn.Parameter(torch.ones(self.schedule.num_skips, cfg.model_dim, dtype=torch.float32))
        tag(self, Role.CONTROL, "skip_weights")
        self.skip_gates = None
        if cfg.skip_gates:
            self.skip_gates = nn.Parameter(torch.zeros(self.schedule.num_skips, cfg.model_dim, dtype=torch.float32))
            tag(self, Role.GATE, "skip_gates")
        if cfg.parallel_from >= 0:  # one row per block, as #1855 (the rows before parallel_from stay unused)
            self.lane_resid = nn.Parameter(torch.full((cfg.num_layers, 2), 1.1, dtype=torch.float32))
            self.lane_post = nn.Parameter(torch.ones(cfg.num_layers, 2, 2, dtype=torch.float32))
            tag(self, Role.GATE, "lane_resid", "lane_post")
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.num_layers))
        self.lm_head = (None if cfg.tie_embeddings else
                        CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True, role=Role.HEAD))
        self._init_weights()
        # Add-ons are built last, after the baseline's init: switching one on leaves every other
        # initial weight unchanged (same seed, same random draws), so an ablation compares like
        # with like. Each add-on initialises its own parameters.
        self.embed_addons = nn.ModuleList(EMBEDDING_ADDONS.build(name, cfg) for name in cfg.embed)
        self.post_norm_addons = nn.ModuleList(POST_NORM_ADDONS.build(name, cfg) for name in cfg.post_norm)
        self.stream_addons = nn.ModuleList(STREAM_ADDONS.build(name, cfg) for name in cfg.stream)
        if cfg.init == "orthogonal":  # after the add-ons: it redraws their projections too
            self._orthogonal_init()

    def _init_weights(self) -> None:
        # Linear layers keep PyTorch's default (Kaiming-uniform) init, as the official baseline;
        # output projections start at zero (CastedLinear's zero_init). The tied embedding is
        # drawn again, small, last: the official order of random draws.
        if self.cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.cfg.tied_embed_init_std)

    def _orthogonal_init(self) -> None:
        # #549's init: every linear that does not start at zero is redrawn orthogonal (gain 1):
        # the blocks' always, any other (the add-ons' projections) when both sides are >= 64.
        in_blocks = {id(m) for m in self.blocks.modules()}
        for module in self.modules():
            if isinstance(module, CastedLinear) and not module.zero_init:
                if id(module) in in_blocks or min(module.weight.shape) >= 64:
                    nn.init.orthogonal_(module.weight)

    def hidden_states(self, input_ids: Tensor) -> Tensor:
        x = self.tok_emb(input_ids)
        for addon in self.embed_addons:
            x = addon(x, input_ids)
        x = rms_norm(x)
        for addon in self.post_norm_addons:
            x = addon(x, input_ids)
        x0 = x
        extras: dict[str, Tensor] = {}
        for addon in self.stream_addons:
            extras.update(addon(input_ids, x0))
        if self.cfg.doc_mask:  # attention stays inside each document (pgolf.model.attention)
            extras[DOC_MASK] = document_mask(input_ids, self.cfg.bos_id, self.cfg.max_span)
        schedule = self.schedule if self.looping or self.schedule.unlooped is None else self.schedule.unlooped
        for i in schedule.plain:
            x = self.blocks[i](x, x0, extras)
        skips = []
        for i in schedule.encoder:
            x = self.blocks[i](x, x0, extras)
            skips.append(x)
        for i in schedule.middle:
            x = self.blocks[i](x, x0, extras)
        m = None  # the second lane, from the first decoder block >= model.parallel_from on
        for j, i in enumerate(schedule.decoder):
            if m is None and 0 <= self.cfg.parallel_from <= i:
                m = x
            if skips:
                skip = self.skip_weights[j].to(x.dtype) * skips.pop()
                gates = self.skip_gates
                x = x + skip if gates is None else torch.lerp(skip, x, torch.sigmoid(gates[j].to(x.dtype)))
            if m is None:
                x = self.blocks[i](x, x0, extras)
            else:
                x, m = self.blocks[i].parallel(x, m, x0, extras, self.lane_resid[i], self.lane_post[i])
        return rms_norm(x if m is None else 0.5 * (x + m))

    def logits(self, input_ids: Tensor) -> Tensor:
        """Softcapped logits, shape (batch, seq, vocab)."""
        x = self.hidden_states(input_ids)
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        raw = F.linear(x, head.to(x.dtype))
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(raw / cap)

    def forward(self, input_ids: Tensor, target_ids: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy in nats (fp32) of target_ids given input_ids."""
        logits = self.logits(input_ids)
        return F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction=reduction
        )


def build_model(cfg: ModelConfig, device: torch.device) -> GPT:
    """Build on device. On CUDA the official layout: a bf16 body (buffers too: RoPE's angles
    are bf16, as the official model's), each parameter then in its role's dtype (fp32 for
    matrices and controls: the optimizer updates full-precision master weights)."""
    model = GPT(cfg).to(device)
    if device.type == "cuda":
        roles = param_roles(model)
        model.bfloat16()
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.data = param.data.to(ROLE_TABLE[roles[name]].cuda_dtype)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_config_problems(cfg: ModelConfig) -> list[str]:
    """What is wrong with the architecture switches of cfg (for pgolf.config.checks.validate): names
    no slot has first (the other checks assume known names), then each part's own checks."""
    unknown = [problem for field, slot in SLOTS.items() for problem in slot.problems(getattr(cfg, field))]
    if unknown:
        return unknown
    init = [f"model.init must be default or orthogonal, got '{cfg.init}'"] if cfg.init not in INITS else []
    if not -1 <= cfg.parallel_from < cfg.num_layers:
        init.append(f"model.parallel_from must be a block index below model.num_layers={cfg.num_layers}, or -1 "
                    f"(off), got {cfg.parallel_from}")
    return mlp_problems(cfg) + layout_problems(cfg) + embed_problems(cfg) + attention_problems(cfg) + init
