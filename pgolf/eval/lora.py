"""Per-document LoRA adapters for test-time training, attached to a GPT from outside it.

Each adapter holds one low-rank update per document of a batch (a leading batch dimension), so
one forward pass over a batch of documents adapts each document with its own weights:
    delta(x) = (x A^T) B^T * alpha / rank,   A: (docs, rank, in), B: (docs, out, rank).
Sites (#1855's): per block application, Q, K and V (each reads the attention's normed input),
O (reads the attention's input, adds to its output) and the MLP (reads the MLP's input, adds to
its output); and the LM head (reads the final hidden state, adds to the raw logits).

The adapters are applied by forward hooks registered only while `attached` is active, so the
model's code and its plain forward stay untouched. A block that runs several times per forward
(model.layout=loop, recurrence, middle_cycle) gets a separate adapter per application: the
hooks count the calls of each module within one forward (`lora_logits` resets the counts).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.model.gpt import GPT

SITES = ("q", "k", "v", "o", "mlp", "head")


class BatchedLoRA(nn.Module):
    def __init__(self, docs: int, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        # Drawn on the CPU from a seeded generator: the same A on every device and rank.
        self.A = nn.Parameter(torch.empty(docs, rank, in_features).uniform_(-bound, bound, generator=generator))
        self.B = nn.Parameter(torch.zeros(docs, out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        n = x.size(0)  # a batch smaller than the adapter (the last one) uses its first rows
        return ((x @ self.A[:n].transpose(1, 2)) @ self.B[:n].transpose(1, 2)) * self.scale


def block_applications(model: GPT) -> list[int]:
    """The block index of each block application of one forward pass, in run order."""
    s = model.schedule if model.looping or model.schedule.unlooped is None else model.schedule.unlooped
    return [*s.plain, *s.encoder, *s.middle, *s.decoder]


class DocLoRA(nn.Module):
    """The adapters of one batch of `docs` documents (see the module docstring)."""

    def __init__(self, model: GPT, docs: int, rank: int, alpha: float, seed: int, sites: tuple[str, ...] = SITES):
        super().__init__()
        unknown = sorted(set(sites) - set(SITES))
        if unknown:
            raise ValueError(f"unknown LoRA sites {unknown}; known: {', '.join(SITES)}")
        self.sites = tuple(s for s in SITES if s in sites)
        self.docs = docs
        self.applications = block_applications(model)
        generator = torch.Generator().manual_seed(seed)
        dim = model.cfg.model_dim
        slots = []
        for i in self.applications:
            attn = model.blocks[i].attn
            if not all(hasattr(attn, name) for name in ("c_q", "c_k", "c_v")):
                raise ValueError(f"per-document LoRA needs attention with c_q, c_k, c_v projections "
                                 f"(model.attention=gqa); block {i} has {type(attn).__name__}")
            shapes = {"q": (dim, attn.c_q.out_features), "k": (dim, attn.c_k.out_features),
                      "v": (dim, attn.c_v.out_features), "o": (dim, dim), "mlp": (dim, dim)}
            slots.append(nn.ModuleDict({site: BatchedLoRA(docs, *shapes[site], rank, alpha, generator)
                                        for site in self.sites if site != "head"}))
        self.slots = nn.ModuleList(slots)
        self.head = BatchedLoRA(docs, dim, model.cfg.vocab_size, rank, alpha, generator) if "head" in sites else None
        # (block, k) -> slot: the k-th application of block within one forward
        self._slot_of: dict[tuple[int, int], int] = {}
        seen: dict[int, int] = {}
        for slot, i in enumerate(self.applications):
            self._slot_of[(i, seen.get(i, 0))] = slot
            seen[i] = seen.get(i, 0) + 1
        self._calls: dict[tuple[int, str], int] = {}

    def reset(self) -> None:
        """Zero every B (each document starts from the base model); A stays as it is."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, BatchedLoRA):
                    module.B.zero_()

    def a_parameters(self) -> list[tuple[str, Tensor]]:
        return [(name, p) for name, p in self.named_parameters() if name.endswith(".A")]

    def _hook(self, block: int, site: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            k = self._calls.get((block, site), 0)
            self._calls[(block, site)] = k + 1
            slot = self._slot_of.get((block, k))
            if slot is None:
                raise RuntimeError(f"block {block}'s {site} ran more often in one forward than the layout's "
                                   f"{self.applications.count(block)} applications")
            return output + self.slots[slot][site](args[0])
        return hook

    @contextlib.contextmanager
    def attached(self, model: GPT):
        handles = []
        try:
            for i in sorted(set(self.applications)):
                block = model.blocks[i]
                modules = {"q": block.attn.c_q, "k": block.attn.c_k, "v": block.attn.c_v, "o": block.attn,
                           "mlp": block.mlp}
                for site in self.sites:
                    if site != "head":
                        handles.append(modules[site].register_forward_hook(self._hook(i, site)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def check_calls(self) -> None:
        for site in self.sites:
            if site == "head":
                continue
            for i in set(self.applications):
                want, got = self.applications.count(i), self._calls.get((i, site), 0)
                if got != want:
                    raise RuntimeError(f"block {i}'s {site} adapter ran {got} times in one forward, the layout has "
                                       f"{want} applications: the model's forward does not match its schedule")


def lora_logits(model: GPT, lora: DocLoRA, input_ids: Tensor) -> Tensor:
    """GPT.logits with the adapters of `lora` (attached by the caller) added."""
    lora._calls.clear()
    x = model.hidden_states(input_ids)
    lora.check_calls()
    head = model.tok_emb.weight if model.lm_head is None else model.lm_head.weight
    raw = F.linear(x, head.to(x.dtype))
    if lora.head is not None:
        raw = raw + lora.head(x)
    cap = model.cfg.logit_softcap
    return cap * torch.tanh(raw / cap)
