"""Phased score-first test-time training with per-document LoRA (#1855's), with a receipt.

Documents. The validation stream is split at each `bos_id` token (and at position 0): a document
is the target range (lo, hi], inputs tokens[lo..hi-1] (its BOS first), targets tokens[lo+1..hi]
(its last target the next document's BOS). A document is only ever scored with its own tokens
as context, so documents are independent of each other except through the adapted weights.

Order. Documents are sorted longest first (ties by position) into batches of `batch_docs`;
only the last batch can be smaller. Batch b of a phase segment goes to rank b mod world_size.

Per batch. Every document gets its own LoRA (pgolf.eval.lora: one slice of a batched adapter).
B is zeroed and a fresh AdamW built per batch; A stays warm from the rank's previous batch (fresh
after each global phase). Each document is cut into chunks of `chunk_tokens` targets; in step c
every document with a chunk c scores it with a window of at most `context` of its own tokens
ending at the chunk's end, then (unless it was its last chunk) one AdamW step is taken on the
sum over documents of each one's mean loss on that chunk: the chunk is scored before any update
uses it, and each document's slice only ever sees its own gradient.

Global phases. Once the documents scored reach each count in `phases`, the base model is trained
(SGD, cosine lr over chunks of `phase_chunk_tokens`, the last chunk skipped, momentum, clipping,
document-masked attention) on the tokens of the documents scored so far, then fresh LoRAs.

Differences from the record, all deliberate: the leading tokens before the first BOS form a
document (every target is scored); ranks take batches round robin inside each phase segment
instead of claiming them through a file lock (deterministic, replayable); the phase training
cuts the stream into rows of `context` tokens (attention masked at every BOS inside a row)
rather than one packed row with segments every `context` tokens from each document start.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pgolf.data.tokenizer import token_bytes
from pgolf.eval.lora import SITES, DocLoRA, lora_logits
from pgolf.eval.receipt import Receipt, state_fingerprint, tensors_fingerprint
from pgolf.eval.ttt import shared_step
from pgolf.eval.windows import ScoreSums, autocast_for
from pgolf.model.gpt import GPT

KIND = "doc_lora"


@dataclass
class DocTTTConfig:
    chunk_tokens: int = 48  # targets per scored-then-trained chunk
    context: int = 2048  # most tokens of a document a window (and a phase row) holds
    batch_docs: int = 64
    rank: int = 80
    alpha: float = 144.0  # LoRA output scale alpha / rank
    lr: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.99
    eps: float = 1e-10
    weight_decay: float = 0.5
    sites: tuple[str, ...] = SITES
    phases: tuple[int, ...] = (833, 1666, 2500)  # documents scored before each global phase; () = none
    phase_lr: float = 1e-3
    phase_momentum: float = 0.9
    phase_epochs: int = 1
    phase_chunk_tokens: int = 32768
    phase_batch_seqs: int = 32  # rows per phase step (split over ranks)
    phase_clip: float = 1.0
    seed: int = 0  # of the LoRA A draws

    def settings(self) -> dict:
        d = asdict(self)
        d["sites"], d["phases"] = list(self.sites), list(self.phases)
        return d


def find_documents(tokens: Tensor, bos_id: int) -> list[tuple[int, int]]:
    """(lo, hi] target ranges of the documents of tokens, in stream order; they tile 1..T."""
    total = tokens.numel() - 1
    starts = sorted({0, *(tokens[:total] == bos_id).nonzero().flatten().tolist()})
    return list(zip(starts, starts[1:] + [total]))


def batch_order(docs: list[tuple[int, int]], batch_docs: int) -> list[list[int]]:
    """Document indices in batches, longest first (ties: stream order)."""
    order = sorted(range(len(docs)), key=lambda d: (docs[d][0] - docs[d][1], docs[d][0]))
    return [order[i: i + batch_docs] for i in range(0, len(order), batch_docs)]


def phase_segments(batches: list[list[int]], phases: tuple[int, ...]) -> list[tuple[int, int]]:
    """[start, end) batch ranges, each followed by a global phase except the last. A phase comes
    after the first batch at which the documents scored reach its count (one phase even if a batch
    crosses several counts); none after the last batch (nothing would be left to score)."""
    segments, start, scored, p = [], 0, 0, 0
    for b, batch in enumerate(batches):
        scored += len(batch)
        if p < len(phases) and scored >= phases[p] and b < len(batches) - 1:
            segments.append((start, b + 1))
            start = b + 1
            while p < len(phases) and scored >= phases[p]:
                p += 1
    segments.append((start, len(batches)))
    return segments


def _distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


@dataclass
class DocScore:
    lo: int
    hi: int
    ctx_from: int  # first token any of its windows read
    ctx_to: int  # last token any of its windows read
    loss_sum: float = 0.0
    tokens: int = 0
    bytes: int = 0
    ops: list[str] = field(default_factory=list)  # "s": a chunk scored, "u": an update on it, in order

    def row(self) -> list:
        return [self.lo, self.hi, self.ctx_from, self.ctx_to, self.loss_sum, self.tokens, self.bytes, "".join(self.ops)]


def score_batch(model: GPT, lora: DocLoRA, tokens: Tensor, luts, docs: list[tuple[int, int]], cfg: DocTTTConfig,
                device: torch.device, illegal_train_first: bool = False) -> list[DocScore]:
    """Score-first LoRA TTT over one batch of documents (lora: at least len(docs) rows, B zero).

    illegal_train_first takes each step on a chunk *before* scoring it: a deliberately illegal
    variant that exists only so the audit can be shown to catch it. Never use it for a score."""
    n, C = len(docs), cfg.chunk_tokens
    lo = torch.tensor([d[0] for d in docs])
    hi = torch.tensor([d[1] for d in docs])
    chunks = [-(-(h - l) // C) for l, h in docs]
    out = [DocScore(l, h, h, l) for l, h in docs]
    optimizer = torch.optim.AdamW(lora.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay)
    sums = torch.zeros(n, 3, dtype=torch.float64, device=device)
    for c in range(max(chunks)):
        active = torch.tensor([c < k for k in chunks])
        c_lo = torch.minimum(lo + c * C, hi)
        c_hi = torch.minimum(lo + (c + 1) * C, hi)
        w_start = torch.maximum(lo, c_hi - cfg.context)  # never before the document's own BOS
        length = torch.where(active, c_hi - w_start, 0)
        # Every row as long as a full chunk's window, whoever shares the batch: a document's score
        # never depends on the other documents' lengths (RoPE with model.rope_ref_len would).
        L = min((c + 1) * C, cfg.context)
        col = torch.arange(L + 1)
        idx = (w_start[:, None] + col[None, :]).clamp(max=tokens.numel() - 1)
        seqs = tokens[idx].to(device=device, dtype=torch.int64)
        valid = (col[None, :L] < length[:, None]).to(device)
        x = torch.where(valid, seqs[:, :-1], 0)
        y = torch.where(valid, seqs[:, 1:], 0)
        # The chunk's targets c_lo+1..c_hi sit at row positions c_lo - w_start .. c_hi - w_start - 1.
        pos = torch.arange(L)[None, :]
        scored = ((pos >= (c_lo - w_start)[:, None]) & (pos < (c_hi - w_start)[:, None]) & active[:, None]).to(device)
        for j in range(n):  # what each window actually read, for the receipt
            if active[j]:
                out[j].ctx_from = min(out[j].ctx_from, int(idx[j, 0]))
                out[j].ctx_to = max(out[j].ctx_to, int(idx[j, int(length[j]) - 1]))
        train = torch.tensor([c < k - 1 for k in chunks], device=device)
        needs_train = c < max(chunks) - 1  # some document has a later chunk (no device sync to know)
        if illegal_train_first and needs_train:
            _step(model, lora, optimizer, x, y, scored, train, device)
            for j in range(n):
                if c < chunks[j] - 1:
                    out[j].ops.append("u")
        # One forward scores the chunk and, kept for backward, trains on it after the score is taken.
        keep_graph = needs_train and not illegal_train_first
        with lora.attached(model), autocast_for(device), torch.set_grad_enabled(keep_graph):
            logits = lora_logits(model, lora, x)
            losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                     reduction="none").view(n, L)
        mask = scored.double()
        if isinstance(luts, Tensor):  # a byte sidecar: the bytes of each target position
            nbytes = luts[(idx[:, 1:]).to(luts.device)].to(device)
        else:
            nbytes = token_bytes(x, y, luts)
        sums += torch.stack(((losses.detach().double() * mask).sum(1), mask.sum(1), (nbytes.double() * mask).sum(1)), 1)
        for j in range(n):
            if active[j]:
                out[j].ops.append("s")
        if not illegal_train_first and needs_train:
            _step(model, lora, optimizer, x, y, scored, train, device, losses)
            for j in range(n):
                if c < chunks[j] - 1:
                    out[j].ops.append("u")
    for j, (loss_sum, count, nbytes) in enumerate(sums.tolist()):
        out[j].loss_sum, out[j].tokens, out[j].bytes = loss_sum, int(count), int(nbytes)
    return out


def _step(model: GPT, lora: DocLoRA, optimizer, x: Tensor, y: Tensor, scored: Tensor, train: Tensor,
          device: torch.device, losses: Tensor | None = None) -> None:
    """One AdamW step on the sum over the training documents of each one's mean chunk loss."""
    if losses is None:
        with lora.attached(model), autocast_for(device):
            logits = lora_logits(model, lora, x)
        losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                 reduction="none").view(x.shape)
    mask = scored.float()
    per_doc = (losses * mask).sum(1) / mask.sum(1).clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    (per_doc * train.float()).sum().backward()
    optimizer.step()


def phase_lr(cfg: DocTTTConfig, chunk: int, num_chunks: int) -> float:
    """Cosine from phase_lr (first chunk) to 0 (the last chunk, which is never trained on)."""
    if num_chunks <= 1:
        return cfg.phase_lr
    return cfg.phase_lr * 0.5 * (1.0 + math.cos(math.pi * chunk / (num_chunks - 1)))


def phase_stream(tokens: Tensor, docs: list[tuple[int, int]]) -> Tensor:
    """The scored documents' own tokens, each from its BOS (lo) to its last input (hi - 1), in
    scoring order. The pair across a seam (a document's last input, the next span's BOS) has the
    value of that document's own last target (the BOS that followed it in the stream)."""
    return torch.cat([tokens[lo:hi] for lo, hi in docs])


def train_phase(model: GPT, stream: Tensor, cfg: DocTTTConfig, device: torch.device, rank: int = 0,
                world_size: int = 1) -> None:
    """Train the base model on `stream` (scored documents only): rows of cfg.context tokens,
    attention masked at every BOS, chunks of phase_chunk_tokens, the last chunk skipped."""
    targets = stream.numel() - 1
    seq = cfg.context
    num_chunks = -(-targets // cfg.phase_chunk_tokens)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=cfg.phase_lr, momentum=cfg.phase_momentum)
    distributed = _distributed(world_size)
    saved = model.cfg.doc_mask
    model.cfg.doc_mask = True  # read by GPT.hidden_states at run time; restored below
    for p in params:
        p.requires_grad_(True)
    model.train()
    try:
        for ci in range(num_chunks - 1):
            lo = ci * cfg.phase_chunk_tokens
            hi = min(lo + cfg.phase_chunk_tokens, targets)
            rows = (hi - lo) // seq
            for group in optimizer.param_groups:
                group["lr"] = phase_lr(cfg, ci, num_chunks)
            for _ in range(cfg.phase_epochs):
                for b in range(0, rows, cfg.phase_batch_seqs):
                    step = list(range(b, min(b + cfg.phase_batch_seqs, rows)))
                    mine = step[len(step) * rank // world_size: len(step) * (rank + 1) // world_size]
                    starts = torch.tensor(mine, dtype=torch.int64)[:, None] * seq + lo
                    seqs = stream[starts + torch.arange(seq + 1)[None, :]].to(device=device, dtype=torch.int64)
                    shared_step(model, optimizer, params, seqs if mine else None, len(step) * seq, device,
                                distributed, cfg.phase_clip)
    finally:
        model.cfg.doc_mask = saved
        model.eval()
        for p in params:
            p.requires_grad_(False)


def _a_fingerprint(lora: DocLoRA) -> str:
    return tensors_fingerprint(lora.a_parameters())


def run_doc_ttt(model: GPT, tokens: Tensor, luts, cfg: DocTTTConfig, device: torch.device, rank: int = 0,
                world_size: int = 1, bos_id: int | None = None, progress=None,
                illegal_train_first: bool = False) -> tuple[ScoreSums, Receipt]:
    """Phased per-document LoRA TTT over every target of `tokens`; returns the sums and the
    receipt (identical on every rank). progress(batches done, batches, docs scored) is called
    after each phase segment and batch of this rank."""
    bos_id = model.cfg.bos_id if bos_id is None else bos_id
    docs = find_documents(tokens, bos_id)
    batches = batch_order(docs, cfg.batch_docs)
    segments = phase_segments(batches, cfg.phases)
    total = tokens.numel() - 1
    settings = {**cfg.settings(), "bos_id": bos_id, "documents": len(docs), "batches": len(batches),
                "world_size": world_size}
    receipt = Receipt(KIND, settings, total, state_fingerprint(model))
    distributed = _distributed(world_size)
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    state = receipt.initial_state
    scored_docs: list[tuple[int, int]] = []
    done = 0
    try:
        for phase, (start, end) in enumerate(segments):
            lora = DocLoRA(model, cfg.batch_docs, cfg.rank, cfg.alpha, cfg.seed + phase, cfg.sites).to(device)
            fresh = True
            mine = []
            for b in range(start + rank, end, world_size):
                batch = [docs[d] for d in batches[b]]
                lora.reset()
                a_start = _a_fingerprint(lora)
                scores = score_batch(model, lora, tokens, luts, batch, cfg, device, illegal_train_first)
                mine.append({"type": "batch", "batch": b, "rank": rank, "state": state, "lora_start": a_start,
                             "lora_fresh": fresh, "lora_end": _a_fingerprint(lora),
                             "docs": [s.row() for s in scores]})
                fresh = False
                if progress is not None:
                    progress(b + 1, len(batches), None)
            gathered = [None] * world_size
            if distributed:
                dist.all_gather_object(gathered, mine)
            else:
                gathered = [mine]
            for event in sorted((e for part in gathered for e in part), key=lambda e: e["batch"]):
                receipt.events.append(event)
                scored_docs.extend((row[0], row[1]) for row in event["docs"])
            done = end
            if phase < len(segments) - 1:
                before = state_fingerprint(model)
                stream = phase_stream(tokens, scored_docs)
                train_phase(model, stream, cfg, device, rank, world_size)
                state = state_fingerprint(model)
                receipt.events.append({"type": "phase", "phase": phase + 1, "before": before, "after": state,
                                       "docs": [list(d) for d in scored_docs], "train_tokens": stream.numel()})
                if progress is not None:
                    progress(done, len(batches), len(scored_docs))
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was_training)
    totals = receipt.finalize()
    return ScoreSums(totals["loss_sum"], totals["tokens"], totals["bytes"]), receipt
