"""Parallel Muon: each rank orthogonalises only its share of the matrices.

The plain `Muon` under DDP needs two full-size collectives per step: DDP all-reduces every
matrix gradient, then Muon all-reduces a zero-padded buffer of the updates. Here:

1. Buckets. The matrices of one shape (a tall matrix joins the bucket of its transpose) are
   cut, in backward order, into buckets of world_size slots; the last bucket of a shape is
   padded with empty slots. Slot r of every bucket belongs to rank r. Every rank derives the
   same buckets from the parameter list, so collectives line up.
2. Reduce-scatter. Each bucket's local gradients (divided by world_size, as DDP averages)
   are reduce-scattered: rank r receives the averaged gradient of the matrix in its slot.
   With `arm_backward_sync(True)` before the last micro-batch's backward, a bucket's
   reduce-scatter starts from gradient hooks as soon as its matrices' gradients are
   accumulated (overlapping the rest of the backward); otherwise `step` starts them all.
3. Each rank runs momentum, Nesterov and batched Newton-Schulz on its matrices only.
4. All-gather. The updates go back to every rank, which applies them (with decoupled weight
   decay) to all matrices, so the weights stay identical on every rank.

The gradients of these matrices must then NOT be all-reduced by DDP as well: `ddp_ignore`
registers them with DDP as ignored parameters before wrapping. Consequence: the matrices' .grad
hold each rank's local gradient; the synchronised ones exist only as the shards of step 2, which
`synced_grads` hands to a gradient clip (pgolf.train.clipping). With one process, or without
torch.distributed, `step` is exactly `Muon.step`.

bf16 (optim.parallel_muon_bf16, the #549 record's form): the reduce-scatter sends the gradients
in bf16, so the averaged gradient shard, the momentum buffer and the Nesterov direction are
bf16, and the updates are all-gathered in bf16. Otherwise the gradients travel and the momentum
is kept in the parameters' dtype and the updates travel in the Newton-Schulz dtype (which is
bf16 on CUDA already). Weight decay and the update are applied in the parameters' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf.train.muon import Muon, decay_and_update, muon_updates

# torch 2.13 renamed the tensor-in/tensor-out collectives; 2.11 (CUDA) has only the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Bucket:
    """world_size slots of one wide shape (rows <= cols); slot r is rank r's matrix."""

    shape: tuple[int, int]
    params: list[Tensor | None] = field(default_factory=list)  # None: padding
    transposed: list[bool] = field(default_factory=list)  # a tall matrix is stored as its transpose


def plan_buckets(params: list[Tensor], world_size: int) -> list[Bucket]:
    """Buckets in the order their gradients complete in a backward pass (last parameter first):
    full buckets as they fill, then each shape's padded remainder."""
    open_buckets: dict[tuple[int, int], Bucket] = {}
    buckets: list[Bucket] = []
    for p in reversed(params):
        tall = p.size(0) > p.size(1)
        shape = (p.size(1), p.size(0)) if tall else (p.size(0), p.size(1))
        bucket = open_buckets.setdefault(shape, Bucket(shape))
        bucket.params.append(p)
        bucket.transposed.append(tall)
        if len(bucket.params) == world_size:
            buckets.append(open_buckets.pop(shape))
    for bucket in open_buckets.values():
        pad = world_size - len(bucket.params)
        bucket.params += [None] * pad
        bucket.transposed += [False] * pad
        buckets.append(bucket)
    return buckets


class ParallelMuon(Muon):
    """Muon whose matrices' gradient sync and orthogonalisation are sharded over the ranks."""

    def __init__(self, params, *args, bf16: bool = False, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.bf16 = bf16
        self._mine: dict[int, list[tuple[int, Tensor, Tensor]]] = {}  # group -> waited (bucket, param, shard)
        self._plans: dict[int, tuple[int, list[Bucket]]] = {}  # per group: (world_size, buckets)
        self._bucket_of: dict[int, tuple[int, int]] = {}  # id(param) -> (group, bucket)
        self._armed = False
        self._ready: dict[tuple[int, int], int] = {}  # (group, bucket) -> gradients accumulated
        self._launched: dict[tuple[int, int], tuple] = {}  # (group, bucket) -> (work, shard)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad)
                       for group in self.param_groups for p in group["params"]]

    # --- layout --------------------------------------------------------------------------
    @staticmethod
    def _world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def buckets(self, group_index: int) -> list[Bucket]:
        world_size, _ = self._world()
        cached = self._plans.get(group_index)
        if cached is None or cached[0] != world_size:
            cached = (world_size, plan_buckets(self.param_groups[group_index]["params"], world_size))
            self._plans[group_index] = cached
            for bi, bucket in enumerate(cached[1]):
                for p in bucket.params:
                    if p is not None:
                        self._bucket_of[id(p)] = (group_index, bi)
        return cached[1]

    def momentum_buffer(self, p: Tensor) -> Tensor:
        buf = super().momentum_buffer(p)
        if self.bf16 and buf.dtype != torch.bfloat16:  # new, or cast to p's dtype by load_state_dict
            buf = self.state[p]["momentum_buffer"] = buf.to(torch.bfloat16)
        return buf

    # --- gradient reduce-scatter --------------------------------------------------------------
    def arm_backward_sync(self, enabled: bool) -> None:
        """Start each bucket's reduce-scatter from the next backward's gradient hooks (set it for
        the last micro-batch only: earlier ones just accumulate local gradients)."""
        self._armed = enabled and self._world()[0] > 1

    @property
    def launched_syncs(self) -> int:
        """Buckets whose gradient reduce-scatter has started since the last step."""
        return len(self._launched)

    def _on_grad(self, param: Tensor) -> None:
        if not self._armed:
            return
        for gi in range(len(self.param_groups)):
            self.buckets(gi)  # plans (and the parameter -> bucket map) for the current world size
        key = self._bucket_of[id(param)]
        self._ready[key] = self._ready.get(key, 0) + 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        """Launch complete buckets in plan order: every rank issues collectives in one order."""
        for gi in range(len(self.param_groups)):
            for bi, bucket in enumerate(self.buckets(gi)):
                key = (gi, bi)
                if key in self._launched:
                    continue
                if self._ready.get(key, 0) < sum(p is not None for p in bucket.params):
                    return
                self._launch(gi, bi)

    def _launch(self, gi: int, bi: int) -> None:
        world_size, _ = self._world()
        bucket = self.buckets(gi)[bi]
        ref = next(p for p in bucket.params if p is not None)
        dtype = torch.bfloat16 if self.bf16 else ref.dtype
        packed = torch.zeros((world_size, *bucket.shape), device=ref.device, dtype=dtype)
        for slot, (p, transposed) in enumerate(zip(bucket.params, bucket.transposed)):
            if p is not None and p.grad is not None:  # a missing gradient counts as zero
                packed[slot].copy_(p.grad.mT if transposed else p.grad)
        packed.div_(world_size)  # the sum over ranks becomes DDP's average
        shard = torch.empty((1, *bucket.shape), device=ref.device, dtype=dtype)  # gloo wants the leading 1
        work = _reduce_scatter(shard, packed, op=dist.ReduceOp.SUM, async_op=True)
        self._launched[(gi, bi)] = (work, shard[0])

    # --- step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        world_size, rank = self._world()
        if world_size == 1:
            return super().step(closure)
        try:
            for gi, group in enumerate(self.param_groups):
                if group["params"]:
                    self._step_group(gi, group, world_size, rank)
        finally:
            self._armed = False
            self._ready.clear()
            self._launched.clear()
            self._mine.clear()
        return None

    def synced_grads(self) -> list[Tensor]:
        """This rank's share of the matrices' averaged gradients, which the next `step` uses (it
        waits for the reduce-scatters, starting any not started): scaling them in place scales the
        update. With one process: the matrices' gradients."""
        if self._world()[0] == 1:
            return [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        return [g for gi, group in enumerate(self.param_groups) if group["params"] for _, _, g in self._wait(gi)]

    def _wait(self, gi: int) -> list[tuple[int, Tensor, Tensor]]:
        """(bucket, param, averaged gradient) of this rank's matrices in group gi."""
        if gi in self._mine:
            return self._mine[gi]
        buckets, rank = self.buckets(gi), self._world()[1]
        for bi in range(len(buckets)):
            if (gi, bi) not in self._launched:
                self._launch(gi, bi)
        mine = self._mine[gi] = []
        for bi, bucket in enumerate(buckets):
            work, shard = self._launched[(gi, bi)]
            work.wait()
            p = bucket.params[rank]
            if p is not None:
                mine.append((bi, p, shard.mT if bucket.transposed[rank] else shard))
        return mine

    def _step_group(self, gi: int, group: dict, world_size: int, rank: int) -> None:
        buckets, mine = self.buckets(gi), self._wait(gi)
        updates = muon_updates([g for _, _, g in mine], [self.momentum_buffer(p) for _, p, _ in mine],
                               group["momentum"], group["nesterov"], group["backend_steps"], self.ns_dtype,
                               self.batched, self.orthogonalize, self.ns_coeffs, self.row_norm)
        own_update = {bi: u for (bi, _, _), u in zip(mine, updates)}
        gathered = []
        for bi, bucket in enumerate(buckets):
            u = own_update.get(bi)
            send = torch.zeros((1, *bucket.shape), device=self._device(bucket),
                               dtype=torch.bfloat16 if self.bf16 else self.ns_dtype)
            if u is not None:
                send[0].copy_(u.mT if bucket.transposed[rank] else u)
            out = torch.empty((world_size, *bucket.shape), device=send.device, dtype=send.dtype)
            gathered.append((_all_gather(out, send, async_op=True), out))
        for bucket, (work, out) in zip(buckets, gathered):
            work.wait()
            for slot, (p, transposed) in enumerate(zip(bucket.params, bucket.transposed)):
                if p is not None:
                    decay_and_update(p, out[slot].mT if transposed else out[slot], group["lr"],
                                     group.get("weight_decay", 0.0))

    @staticmethod
    def _device(bucket: Bucket) -> torch.device:
        return next(p for p in bucket.params if p is not None).device


def ddp_ignore(module: nn.Module, params: list[Tensor]) -> list[str]:
    """Tell DDP (before wrapping `module`) not to all-reduce `params`: Parallel Muon syncs them.
    Returns the ignored names, as DDP sees them (a compiled module prefixes `_orig_mod.`)."""
    wanted = {id(p) for p in params}
    names = [name for name, p in module.named_parameters() if id(p) in wanted]
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(module, names)
    return names
