"""Phased per-document LoRA TTT (pgolf.eval.doc_ttt): its scores equal a slow reference written
here (document by document, chunk by chunk, one unbatched LoRA per document, the global phases
as a plain loop over segments), documents never see each other's tokens, the receipt passes the
audit, and the audit fails on reordered, tampered or deliberately illegal receipts."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from pgolf.data.tokenizer import ByteTokenizer
from pgolf.eval.audit import AuditFailure, audit_file, audit_receipt, rescore_file
from pgolf.eval.doc_ttt import (DocTTTConfig, batch_order, find_documents, phase_segments, run_doc_ttt)
from pgolf.eval.lora import DocLoRA, block_applications
from pgolf.eval.receipt import receipt_digest, write_receipt
from pgolf.model.config import ModelConfig
from pgolf.model.gpt import GPT
from tests.gloo import run_ranks

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CPU = torch.device("cpu")
V, BOS = 64, 1
# Documents of 37, 43, 1, 119, 133, 67, 100 targets (and a last one without a following BOS).
BOS_AT = (0, 37, 80, 81, 200, 333, 400, 500)
N_TOKENS = 561


def tiny_model(layout: str = "unet", seed: int = 0) -> GPT:
    extra = dict(layout="loop", loop_start=1, loop_end=1, loop_passes=2) if layout == "loop" else {}
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=V, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2, **extra))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # real values in the zero-initialised projections
        for name, p in model.named_parameters():
            if p.ndim == 2 and "resid_mix" not in name and "skip" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / (1 if name == "tok_emb.weight" else math.sqrt(p.shape[1])))
    return model


def stream(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, V, (N_TOKENS,), generator=g)
    tokens[list(BOS_AT)] = BOS
    return tokens


LUTS = ByteTokenizer().byte_luts(V).to_torch("cpu")


def config(**overrides) -> DocTTTConfig:
    return DocTTTConfig(**{"chunk_tokens": 16, "context": 40, "batch_docs": 3, "rank": 4, "alpha": 6.0, "lr": 0.02,
                           "weight_decay": 0.5, "phases": (3, 6), "phase_lr": 0.05, "phase_chunk_tokens": 96,
                           "phase_batch_seqs": 2, **overrides})


def rows(receipt) -> dict[tuple[int, int], list]:
    return {(r[0], r[1]): r for e in receipt.events if e["type"] == "batch" for r in e["docs"]}


# --- the slow reference ------------------------------------------------------------------------

def reference(model: GPT, tokens: torch.Tensor, cfg: DocTTTConfig) -> dict[tuple[int, int], tuple[float, int, int]]:
    """(loss_sum, tokens, bytes) per document, computed one document and one chunk at a time."""
    ids = tokens.tolist()
    base, lead, boundary = (t.tolist() for t in LUTS)
    total = len(ids) - 1
    starts = [0] + [i for i in range(1, total) if ids[i] == BOS]
    docs = list(zip(starts, starts[1:] + [total]))
    order = sorted(docs, key=lambda d: (d[0] - d[1], d[0]))
    batches = [order[i: i + cfg.batch_docs] for i in range(0, len(order), cfg.batch_docs)]
    applications = block_applications(model)
    scale = cfg.alpha / cfg.rank
    results, scored, phase, done, next_phase = {}, [], 0, 0, 0
    a_rows = None
    for b, batch in enumerate(batches):
        if a_rows is None:  # fresh LoRAs: the same draws as the batched module's (its rows)
            init = DocLoRA(model, cfg.batch_docs, cfg.rank, cfg.alpha, cfg.seed + phase)
            a_rows = [{name: p[j].detach().clone() for name, p in init.named_parameters() if name.endswith(".A")}
                      for j in range(cfg.batch_docs)]
        chunks = [-(-(hi - lo) // cfg.chunk_tokens) for lo, hi in batch]
        batch_steps = max(chunks) - 1
        for j, (lo, hi) in enumerate(batch):
            A = {name: a.clone().requires_grad_(True) for name, a in a_rows[j].items()}
            B = {name[:-1] + "B": torch.zeros(_out(model, name), cfg.rank, requires_grad=True)
                 for name, p in A.items()}
            opt = torch.optim.AdamW([*A.values(), *B.values()], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                    weight_decay=cfg.weight_decay)
            loss_sum, count, nbytes = 0.0, 0, 0
            for c in range(chunks[j]):
                c_lo, c_hi = lo + c * cfg.chunk_tokens, min(lo + (c + 1) * cfg.chunk_tokens, hi)
                w = max(lo, c_hi - cfg.context)
                x = torch.tensor(ids[w:c_hi])[None]
                y = torch.tensor(ids[w + 1:c_hi + 1])
                losses = _lora_forward(model, applications, A, B, scale, x, y)
                chunk = losses[c_lo - w:]  # the chunk's targets c_lo+1..c_hi
                loss_sum += chunk.double().sum().item()
                count += chunk.numel()
                nbytes += sum(base[ids[t]] + (lead[ids[t]] and not boundary[ids[t - 1]])
                              for t in range(c_lo + 1, c_hi + 1))
                if c < chunks[j] - 1:
                    opt.zero_grad()
                    chunk.mean().backward()
                    opt.step()
            with torch.no_grad():  # the batch's remaining steps only decay this document's rows
                for _ in range(batch_steps - (chunks[j] - 1)):
                    for a in A.values():
                        a.mul_(1 - cfg.lr * cfg.weight_decay)
            a_rows[j] = {name: a.detach().clone() for name, a in A.items()}
            results[(lo, hi)] = (loss_sum, count, nbytes)
            scored.append((lo, hi))
        done += len(batch)
        if next_phase < len(cfg.phases) and done >= cfg.phases[next_phase] and b < len(batches) - 1:
            _reference_phase(model, torch.cat([tokens[lo:hi] for lo, hi in scored]), cfg)
            while next_phase < len(cfg.phases) and done >= cfg.phases[next_phase]:
                next_phase += 1
            phase += 1
            a_rows = None
    return results


def _out(model: GPT, name: str) -> int:
    site = name.split(".")[-2]
    if name.startswith("head"):
        return model.cfg.vocab_size
    attn = model.blocks[0].attn
    return {"q": attn.c_q.out_features, "k": attn.c_k.out_features, "v": attn.c_v.out_features}.get(
        site, model.cfg.model_dim)


def _lora_forward(model, applications, A, B, scale, x, y):
    """Per-token losses with one document's own (unbatched) LoRA, by hooks written here."""
    seen = {}
    handles = []

    def add(site, block):
        def hook(module, args, output):
            k = seen.get((site, block), 0)
            seen[(site, block)] = k + 1
            slot = [s for s, i in enumerate(applications) if i == block][k]
            a, b = A[f"slots.{slot}.{site}.A"], B[f"slots.{slot}.{site}.B"]
            return output + args[0] @ a.T @ b.T * scale
        return hook

    for i in set(applications):
        blk = model.blocks[i]
        for site, module in (("q", blk.attn.c_q), ("k", blk.attn.c_k), ("v", blk.attn.c_v), ("o", blk.attn),
                             ("mlp", blk.mlp)):
            handles.append(module.register_forward_hook(add(site, i)))
    try:
        h = model.hidden_states(x)
    finally:
        for handle in handles:
            handle.remove()
    raw = h @ model.tok_emb.weight.T + h @ A["head.A"].T @ B["head.B"].T * scale
    logits = model.cfg.logit_softcap * torch.tanh(raw / model.cfg.logit_softcap)
    return F.cross_entropy(logits[0], y, reduction="none")


def _reference_phase(model: GPT, tokens: torch.Tensor, cfg: DocTTTConfig) -> None:
    """SGD on the scored documents: each row cut at its BOS tokens and every segment run alone
    (what document-masked attention computes: RoPE sees only relative positions)."""
    targets = tokens.numel() - 1
    num_chunks = -(-targets // cfg.phase_chunk_tokens)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.phase_lr, momentum=cfg.phase_momentum)
    for ci in range(num_chunks - 1):
        lo = ci * cfg.phase_chunk_tokens
        n_rows = (min(lo + cfg.phase_chunk_tokens, targets) - lo) // cfg.context
        lr = cfg.phase_lr * 0.5 * (1 + math.cos(math.pi * ci / (num_chunks - 1)))
        for group in opt.param_groups:
            group["lr"] = lr
        for b in range(0, n_rows, cfg.phase_batch_seqs):
            batch = range(b, min(b + cfg.phase_batch_seqs, n_rows))
            opt.zero_grad()
            loss = 0.0
            for r in batch:
                x = tokens[lo + r * cfg.context: lo + (r + 1) * cfg.context]
                y = tokens[lo + r * cfg.context + 1: lo + (r + 1) * cfg.context + 1]
                cuts = [0] + [k for k in range(1, len(x)) if x[k] == BOS] + [len(x)]
                for s, e in zip(cuts, cuts[1:]):
                    loss = loss + F.cross_entropy(model.logits(x[None, s:e])[0].float(), y[s:e], reduction="sum")
            (loss / (len(batch) * cfg.context)).backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), cfg.phase_clip)
            opt.step()


# --- equality with the reference ---------------------------------------------------------------

@pytest.mark.parametrize("layout", ["unet", "loop"])
def test_scores_equal_the_slow_reference(layout):
    tokens, cfg = stream(), config()
    _, receipt = run_doc_ttt(tiny_model(layout), tokens, LUTS, cfg, CPU)
    assert [e["type"] for e in receipt.events] == ["batch", "phase", "batch", "phase", "batch"]
    want = reference(tiny_model(layout), tokens, cfg)
    got = rows(receipt)
    assert set(got) == set(want) and len(want) == len(BOS_AT)
    for doc, (loss, count, nbytes) in want.items():
        assert got[doc][5:7] == [count, nbytes]
        assert got[doc][4] == pytest.approx(loss, rel=2e-5, abs=1e-4), doc
    # TTT really moved the scores (far beyond the tolerance), so the comparison means something.
    _, still = run_doc_ttt(tiny_model(layout), tokens, LUTS, config(lr=0.0, phases=()), CPU)
    assert abs(still.totals["loss_sum"] - receipt.totals["loss_sum"]) > 1.0


def test_loop_layout_gets_one_lora_per_block_application():
    model = tiny_model("loop")
    assert block_applications(model) == [0, 1, 1, 2]
    lora = DocLoRA(model, 2, 4, 8.0, seed=0)
    assert len(lora.slots) == 4
    assert not torch.equal(lora.slots[1]["q"].A, lora.slots[2]["q"].A)


def test_without_adaptation_each_document_scores_as_it_would_alone():
    tokens, cfg = stream(), config(lr=0.0, phases=())
    model = tiny_model()
    _, receipt = run_doc_ttt(model, tokens, LUTS, cfg, CPU)
    for (lo, hi), row in rows(receipt).items():
        loss = 0.0
        for c_lo in range(lo, hi, cfg.chunk_tokens):
            c_hi = min(c_lo + cfg.chunk_tokens, hi)
            w = max(lo, c_hi - cfg.context)
            with torch.no_grad():
                losses = model(tokens[None, w:c_hi], tokens[None, w + 1:c_hi + 1], reduction="none")
            loss += losses[c_lo - w:].double().sum().item()
        assert row[4] == pytest.approx(loss, rel=1e-6), (lo, hi)


# --- documents are independent -----------------------------------------------------------------

def _edit_document(tokens: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Other non-BOS tokens inside document (lo, hi]: same length, so the same batches."""
    edited = tokens.clone()
    inner = torch.arange(lo + 1, hi)
    edited[inner] = (edited[inner] - 2 + 7) % (V - 2) + 2
    return edited


def test_a_later_document_never_changes_an_earlier_documents_scores():
    tokens, cfg = stream(), config()
    docs = find_documents(tokens, BOS)
    batches = batch_order(docs, cfg.batch_docs)
    later = docs[batches[-1][0]]  # in the last batch, after both phases
    _, before = run_doc_ttt(tiny_model(), tokens, LUTS, cfg, CPU)
    _, after = run_doc_ttt(tiny_model(), _edit_document(tokens, *later), LUTS, cfg, CPU)
    a, b = rows(before), rows(after)
    earlier = [docs[d] for batch in batches[:-1] for d in batch]
    assert all(a[d] == b[d] for d in earlier)  # bit for bit
    assert a[later][4] != b[later][4]


def test_documents_of_one_batch_do_not_see_each_other():
    tokens, cfg = stream(), config(phases=())
    docs = find_documents(tokens, BOS)
    batch = batch_order(docs, cfg.batch_docs)[0]
    edited = docs[batch[1]]
    _, before = run_doc_ttt(tiny_model(), tokens, LUTS, cfg, CPU)
    _, after = run_doc_ttt(tiny_model(), _edit_document(tokens, *edited), LUTS, cfg, CPU)
    a, b = rows(before), rows(after)
    for d in (batch[0], batch[2]):
        assert a[docs[d]][4] == pytest.approx(b[docs[d]][4], rel=1e-6)
    assert a[edited][4] != b[edited][4]


def test_documents_split_at_bos_and_batch_longest_first():
    tokens = stream()
    docs = find_documents(tokens, BOS)
    assert docs == [(0, 37), (37, 80), (80, 81), (81, 200), (200, 333), (333, 400), (400, 500), (500, 560)]
    batches = batch_order(docs, 3)
    assert [[docs[d][1] - docs[d][0] for d in b] for b in batches] == [[133, 119, 100], [67, 60, 43], [37, 1]]
    assert phase_segments(batches, (3, 6)) == [(0, 1), (1, 2), (2, 3)]
    assert phase_segments(batches, (2, 4, 5)) == [(0, 1), (1, 2), (2, 3)]  # batch 2 crosses 4 and 5: one phase
    assert phase_segments(batches, (8,)) == [(0, 3)]  # nothing left to score after the last batch
    # A stream that does not start with BOS: its head is a document too, so every target is scored.
    assert find_documents(tokens[1:], BOS)[0] == (0, 36)


# --- the receipt and the audit -----------------------------------------------------------------

@pytest.fixture(scope="module")
def honest():
    _, receipt = run_doc_ttt(tiny_model(), stream(), LUTS, config(), CPU)
    return receipt.body()


def sealed(body: dict) -> dict:
    return {**body, "sha256": receipt_digest(body)}


def test_honest_receipt_passes_the_audit(honest, tmp_path):
    report = audit_receipt(sealed(honest))
    assert report.kind == "doc_lora" and report.scored_targets == N_TOKENS - 1
    assert report.updates == 2 + sum(-(-(hi - lo) // 16) - 1 for lo, hi in find_documents(stream(), BOS))
    # Written and read back through the file path `pgolf audit` takes.
    from pgolf.eval.receipt import Receipt

    receipt = Receipt(honest["kind"], honest["settings"], honest["total_targets"], honest["initial_state"],
                      honest["events"], honest["totals"])
    assert audit_file(write_receipt(tmp_path / "r.json", receipt)) == report


def _fails(body: dict, message: str) -> None:
    with pytest.raises(AuditFailure, match=message):
        audit_receipt(sealed(body))


def test_audit_fails_on_an_update_before_its_score(honest):
    body = copy.deepcopy(honest)
    row = body["events"][0]["docs"][0]
    row[7] = "us" + row[7][2:]  # the first chunk trained on before it was scored
    _fails(body, "scored before the one update")
    with pytest.raises(AuditFailure, match="sha256"):  # and without resealing, the digest catches any edit
        audit_receipt({**body, "sha256": receipt_digest(honest)})


def test_audit_fails_when_a_phase_moves_before_the_documents_it_trains_on(honest):
    body = copy.deepcopy(honest)
    events = body["events"]
    events[0], events[1] = events[1], events[0]  # the phase first: it trains on unscored documents
    _fails(body, "not\\s+yet scored|starts from state")
    body = copy.deepcopy(honest)
    body["events"][1]["docs"].append(list(body["events"][2]["docs"][0][:2]))
    _fails(body, "not yet scored")


def test_audit_fails_on_batches_reordered_across_a_phase(honest):
    body = copy.deepcopy(honest)
    events = body["events"]
    events[2], events[4] = events[4], events[2]  # same documents, other base states
    _fails(body, "base state")


def test_audit_fails_on_context_from_another_document(honest):
    body = copy.deepcopy(honest)
    body["events"][0]["docs"][1][2] -= 1
    _fails(body, "context from another document")


def test_audit_fails_on_missing_duplicated_or_miscounted_documents(honest):
    body = copy.deepcopy(honest)
    body["events"][4]["docs"].pop()
    _fails(body, "not scored by any document|only targets")
    body = copy.deepcopy(honest)
    body["events"][4]["docs"].append(copy.deepcopy(body["events"][4]["docs"][0]))
    _fails(body, "scored twice")
    body = copy.deepcopy(honest)
    body["events"][0]["docs"][0][4] -= 1.0  # a lower loss
    _fails(body, "reported totals")


def test_audit_fails_on_loras_of_unknown_origin(honest):
    body = copy.deepcopy(honest)
    body["events"][2]["lora_fresh"] = False  # after a phase, claims to continue a chain that does not exist
    _fails(body, "unknown origin")


def test_the_illegal_train_first_variant_fails_the_audit():
    _, receipt = run_doc_ttt(tiny_model(), stream(), LUTS, config(), CPU, illegal_train_first=True)
    with pytest.raises(AuditFailure, match="scored before the one update"):
        audit_receipt(sealed(receipt.body()))


# --- the command line --------------------------------------------------------------------------

def test_pgolf_eval_doc_lora_writes_a_receipt_pgolf_audit_accepts(tmp_path, capsys):
    from pgolf.cli import main as cli_main
    from pgolf.train.run import run_training
    from tests.train.test_train import tiny_config

    summary = run_training(tiny_config(tmp_path, "train.iterations=4", "train.val_loss_every=0", "run.run_id=t"),
                           console=False)
    assert summary["status"] == "done"
    run = tmp_path / "runs" / "t"
    path = tmp_path / "doc.json"
    assert cli_main(["eval", str(run), "--json", "--device", "cpu", "--max-tokens", "2048", "--ttt-mode", "doc_lora",
                     "--doc-context", "64", "--doc-batch", "4", "--lora-rank", "4", "--phases", "none",
                     "--receipt", str(path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "doc_lora" and result["tokens"] == 2048
    assert result["projected_full_seconds"] >= result["load_seconds"] > 0
    data = json.loads(path.read_text())
    assert data["settings"]["rank"] == 4 and data["settings"]["phases"] == []
    assert cli_main(["audit", str(path)]) == 0
    # --rescore replays it from the artifact bit for bit, and catches lowered sums the plain audit accepts.
    assert cli_main(["audit", str(path), "--rescore", "--artifact", str(run / "model.pgolf")]) == 0
    body = {k: v for k, v in data.items() if k != "sha256"}
    body["events"][0]["docs"][0][4] -= 0.5
    body["totals"]["loss_sum"] -= 0.5
    from pgolf.data.tokenizer import bits_per_byte

    t = body["totals"]
    t["val_loss"], t["val_bpb"] = t["loss_sum"] / t["tokens"], bits_per_byte(t["loss_sum"], t["tokens"], t["bytes"])
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(sealed(body)))
    assert audit_file(forged).kind == "doc_lora"
    with pytest.raises(AuditFailure, match="differs when rescored"):
        rescore_file(forged, artifact=run / "model.pgolf")
    assert cli_main(["eval", str(run), "--device", "cpu", "--ttt", "--ttt-mode", "doc_lora", "--phases", "9,3"]) != 0


def test_eval_options_name_each_bad_doc_lora_setting():
    from pgolf.config import ConfigError
    from pgolf.eval.run import EvalOptions, check_eval_options
    from pgolf.eval.ttt import TTTConfig

    check_eval_options(EvalOptions(doc_ttt=DocTTTConfig()))
    for bad, option in ((dict(rank=0), "--lora-rank"), (dict(chunk_tokens=0), "--doc-chunk"),
                        (dict(beta2=1.0), "--lora-beta2"), (dict(phases=(5, 5)), "--phases"),
                        (dict(sites=("q", "x")), "--lora-sites"), (dict(lr=-1.0), "--lora-lr")):
        with pytest.raises(ConfigError, match=option):
            check_eval_options(EvalOptions(doc_ttt=DocTTTConfig(**bad)))
    with pytest.raises(ConfigError, match="exclude each other"):
        check_eval_options(EvalOptions(ttt=TTTConfig(), doc_ttt=DocTTTConfig()))


# --- two real processes (gloo) -----------------------------------------------------------------

def _doc_ttt_on_ranks(rank: int, world_size: int) -> dict:
    out = {}
    for name, cfg in (("phased", config()), ("round_robin", config(batch_docs=2, phases=()))):
        _, receipt = run_doc_ttt(tiny_model(), stream(), LUTS, cfg, CPU, rank=rank, world_size=world_size)
        out[name] = receipt.body()
    return out


def test_two_gloo_processes_share_the_batches_and_write_one_receipt(tmp_path):
    outs = run_ranks(_doc_ttt_on_ranks, tmp_path)
    assert outs[0] == outs[1]  # every rank holds the whole receipt
    # One batch per phase segment: rank 0 scores them all, both ranks train each phase (gradients
    # all-reduced), so the scores are the single process's up to the order of float sums.
    phased = outs[0]["phased"]
    _, single = run_doc_ttt(tiny_model(), stream(), LUTS, config(), CPU)
    assert audit_receipt(sealed(phased)).val_bpb == pytest.approx(single.totals["val_bpb"], rel=1e-5)
    assert {e["rank"] for e in phased["events"] if e["type"] == "batch"} == {0}
    # Round robin: rank 1 takes batches 1 and 3 with its own (fresh) LoRAs; the receipt still audits.
    rr = outs[0]["round_robin"]
    batches = [e for e in rr["events"] if e["type"] == "batch"]
    assert [(e["batch"], e["rank"], e["lora_fresh"]) for e in batches] == [
        (0, 0, True), (1, 1, True), (2, 0, False), (3, 1, False)]
    assert audit_receipt(sealed(rr)).scored_targets == N_TOKENS - 1
    _, single = run_doc_ttt(tiny_model(), stream(), LUTS, config(batch_docs=2, phases=()), CPU)
    assert batches[0]["docs"] == single.events[0]["docs"]  # the same first batch, bit for bit
