"""Add-ons around the token embedding, in PR #549's forms: a hashed table of token bigrams
(model.embed=bigram), a per-channel smear with the previous position (model.post_norm=smear)
and value embeddings added to the values of chosen attention layers (model.stream=value_embed);
and #1855's token-gated smear of the raw embedding that stops at documents (model.embed=smear_bos)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pgolf.model.config import ModelConfig, layer_list_problems, layer_set
from pgolf.model.layers import CastedLinear
from pgolf.model.registry import EMBEDDING_ADDONS, POST_NORM_ADDONS, STREAM_ADDONS
from pgolf.model.roles import Role, tag


class ProjectedTable(nn.Module):
    """scale * proj(table[ids]): a token-indexed table, projected to out_dim unless that is its
    width. The projection keeps the default init, not zero: with the bigram's zero table neither
    would ever get a gradient (#549 zeroes it too, but its orthogonal init then redraws it;
    model.init=orthogonal does the same here)."""

    def __init__(self, rows: int, dim: int, out_dim: int, scale: float):
        super().__init__()
        self.table = nn.Embedding(rows, dim)
        tag(self.table, Role.EMBEDDING, "weight")
        self.proj = CastedLinear(dim, out_dim, role=Role.SIDE_MATRIX) if dim != out_dim else None
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float32))
        tag(self, Role.GATE, "scale")

    def lookup(self, ids: Tensor) -> Tensor:
        h = self.table(ids)
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(h.dtype)


def bigram_buckets(input_ids: Tensor, buckets: int) -> Tensor:
    """Bucket of (t_{i-1}, t_i): (36313 t_i XOR 27191 t_{i-1}) mod (buckets - 1); position 0 of
    each row has no previous token and gets the last bucket. In int32 as #549: the products fit
    for token ids below 2**31 / 36313 (about 59,000), and would wrap above, as the record's do."""
    t = input_ids.to(torch.int32)
    out = torch.full_like(t, buckets - 1)
    out[..., 1:] = torch.bitwise_xor(36313 * t[..., 1:], 27191 * t[..., :-1]) % (buckets - 1)
    return out.long()


@EMBEDDING_ADDONS.register("bigram")
class BigramHash(ProjectedTable):
    """Adds scale * P E[bucket(t_{i-1}, t_i)] to the token embedding; the table starts at zero."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.bigram_buckets, cfg.bigram_dim, cfg.model_dim, scale=0.05)
        nn.init.zeros_(self.table.weight)

    def forward(self, x: Tensor, input_ids: Tensor) -> Tensor:
        return x + self.lookup(bigram_buckets(input_ids, self.table.num_embeddings))


@POST_NORM_ADDONS.register("smear")
class SmearGate(nn.Module):
    """x_t <- (1 - s) x_t + s x_{t-1} per channel, s = sigmoid(gate), x_{-1} = 0. The gate
    starts at 0: half of the previous position from the first step, as #549."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(cfg.model_dim, dtype=torch.float32))
        tag(self, Role.GATE, "gate")

    def forward(self, x: Tensor, input_ids: Tensor) -> Tensor:
        s = torch.sigmoid(self.gate.to(x.dtype))
        previous = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)
        return (1 - s) * x + s * previous


@EMBEDDING_ADDONS.register("smear_bos")
class SmearBOS(nn.Module):
    """e_t <- e_t + lam * sigmoid(w . e_t[:smear_dims]) * e_{t-1} for t >= 1, except where token t is
    model.bos_id: a document's first token takes nothing from the one before. On the raw embedding,
    before the norm; w and lam start at 0 (off at init), as #1855."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bos_id = cfg.bos_id
        self.gate = nn.Parameter(torch.zeros(cfg.smear_dims, dtype=torch.float32))
        self.lam = nn.Parameter(torch.zeros((), dtype=torch.float32))
        tag(self, Role.GATE, "gate", "lam")

    def forward(self, x: Tensor, input_ids: Tensor) -> Tensor:
        cur = x[:, 1:]
        g = self.lam.to(x.dtype) * torch.sigmoid(cur[..., :self.gate.numel()] @ self.gate.to(x.dtype))
        g = g * (input_ids[:, 1:] != self.bos_id).to(x.dtype)
        return torch.cat((x[:, :1], cur + g[..., None] * x[:, :-1]), dim=1)


VALUE_EMBED = "value_embed"  # its key in the attention's extras


@STREAM_ADDONS.register(VALUE_EMBED)
class ValueEmbedding(ProjectedTable):
    """One table shared by the layers model.ve_layers: hands scale * P E[t] (the K/V width) to the
    attention, which in those layers adds it, times its own scalar, to the values."""

    def __init__(self, cfg: ModelConfig):
        kv_dim = cfg.num_kv_heads * (cfg.model_dim // cfg.num_heads)
        super().__init__(cfg.vocab_size, cfg.ve_dim, kv_dim, scale=0.1)
        nn.init.normal_(self.table.weight, std=0.01)

    def forward(self, input_ids: Tensor, x0: Tensor) -> dict[str, Tensor]:
        return {VALUE_EMBED: self.lookup(input_ids)}


def value_embed_layers(cfg: ModelConfig) -> frozenset[int]:
    return layer_set(cfg.ve_layers, cfg.num_layers) if VALUE_EMBED in cfg.stream else frozenset()


def embed_problems(cfg: ModelConfig) -> list[str]:
    """What is wrong with the add-ons' keys of cfg (the names are registered ones)."""
    problems, defaults = [], ModelConfig()
    for name, field, keys in (("bigram", "embed", ("bigram_buckets", "bigram_dim")),
                              (VALUE_EMBED, "stream", ("ve_dim", "ve_layers")),
                              ("smear_bos", "embed", ("smear_dims",))):  # bos_id: doc_mask, doc_packing read it too
        if name not in getattr(cfg, field):
            problems += [f"model.{key} applies only with model.{field} including {name}: add it there, or leave "
                         f"model.{key} at its default" for key in keys if getattr(cfg, key) != getattr(defaults, key)]
    if VALUE_EMBED in cfg.stream:
        problems += layer_list_problems(cfg, "ve_layers")
        if not cfg.ve_layers:
            problems.append("model.stream=value_embed needs model.ve_layers, the layers that use it (e.g. [-2, -1])")
    if "smear_bos" in cfg.embed and (cfg.smear_dims > cfg.model_dim or cfg.bos_id >= cfg.vocab_size):
        problems.append(f"model.smear_dims must be at most model.model_dim={cfg.model_dim} and model.bos_id below "
                        f"model.vocab_size={cfg.vocab_size}, got {cfg.smear_dims} and {cfg.bos_id}")
    return problems
