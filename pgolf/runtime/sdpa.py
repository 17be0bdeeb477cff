"""Which scaled-dot-product-attention kernel training uses (train.sdpa_backend).

`auto` times each CUDA kernel (FlashAttention, cuDNN, memory-efficient) on the run's own
attention shape, forward + backward in bf16, and keeps the fastest; a named backend is taken
as is. Either way the math kernel stays allowed as the fallback for shapes the chosen one does
not support. The choice holds while the context is entered, compilation included (inductor
fixes the kernel when it traces). On CPU it changes nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pgolf.rules import MICRO_BATCHES

CANDIDATES = ("flash", "cudnn", "efficient")


def backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    head_dim: int


def attention_shape(cfg) -> AttentionShape:
    """The training micro-batch's attention shape for a resolved pgolf Config (the same on every
    rank whatever the world size: the batch is always cut into 8 micro-batches)."""
    batch = max(cfg.train.train_batch_tokens // (MICRO_BATCHES * cfg.train.train_seq_len), 1)
    m = cfg.model
    return AttentionShape(batch, m.num_heads, m.num_kv_heads, cfg.train.train_seq_len, m.model_dim // m.num_heads)


def time_backend(name: str, shape: AttentionShape, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                 repeats: int = 5) -> float:
    """Milliseconds of one causal attention forward + backward with only `name` allowed.
    Raises RuntimeError when the kernel cannot run this shape / dtype / device."""
    from torch.nn.attention import sdpa_kernel

    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(shape.batch, shape.heads, shape.seq_len, shape.head_dim, device=device, dtype=dtype,
                    generator=gen, requires_grad=True)
    k, v = (torch.randn(shape.batch, shape.kv_heads, shape.seq_len, shape.head_dim, device=device, dtype=dtype,
                        generator=gen, requires_grad=True) for _ in range(2))

    def run() -> None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=shape.kv_heads != shape.heads)
        out.sum().backward()

    with sdpa_kernel([backend_enum(name)]):
        run()  # warm up (and fail here if unsupported)
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        _sync(device)
    return 1000.0 * (time.perf_counter() - start) / repeats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_fastest(timer: Callable[[str], float], candidates=CANDIDATES) -> tuple[str, dict[str, float | None]]:
    """The candidate with the smallest time; one that raises is unavailable (None). Math when none runs."""
    timings: dict[str, float | None] = {}
    for name in candidates:
        try:
            timings[name] = timer(name)
        except RuntimeError:
            timings[name] = None
    available = {n: t for n, t in timings.items() if t is not None}
    return (min(available, key=available.get) if available else "math"), timings


@contextlib.contextmanager
def sdpa_backend(setting: str, device: torch.device, shape: AttentionShape,
                 log: Callable[[str], None] | None = None, agree: Callable = lambda choice: choice):
    """Enter the configured attention kernel (plus math as fallback) for CUDA; a no-op on CPU.

    agree: makes every rank use one choice (e.g. DistInfo.broadcast_object: rank 0's)."""
    if device.type != "cuda":
        yield None
        return
    timings: dict[str, float | None] = {}
    name = setting
    if setting == "auto":
        name, timings = pick_fastest(lambda n: time_backend(n, shape, device))
    name, timings = agree((name, timings))
    if log is not None:
        measured = ", ".join(f"{n} {'n/a' if t is None else f'{t:.2f}ms'}" for n, t in timings.items())
        log(f"sdpa_backend: {name}" + (f" (fastest of {measured})" if measured else "") + " + math fallback")
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend_enum(name), backend_enum("math")] if name != "math" else [backend_enum("math")]):
        yield name
