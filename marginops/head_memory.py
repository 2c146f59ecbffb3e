"""Per-rank memory of a class-parallel head (``DistributedMarginLoss``): a model of what one training step allocates.

Each term is read off the code that allocates it (docs/DESIGN.md §6.6 lists where), for the rank with the most rows
(``ceil(num_classes / world)`` classes × k sub-centers = R rows of D), e = the weight's element size, acc = the
accumulation dtype's (8 for float64, else 4), N = world × batch_per_rank gathered rows:

* weight, gradient: R·D·e each.  The gradient is dense under Partial FC too (unsampled rows are exactly 0).
* optimizer_state: SGD with momentum R·D·e; AdamW 2·R·D·e (its two moments); none 0.
* optimizer_step: temporaries of ``opt.step()``: AdamW's for-loop implementation (torch's default for CPU tensors)
  forms sqrt(v) and then its quotient, 2·R·D·e; the foreach one (the CUDA default) 1·R·D·e; ``fused=True`` and
  SGD none.
* workspace: the fused op's scratch.  CPU (csrc/cpu/fused_lse_cpu.cpp): per thread, a B × (k·chunk) block, three
  k·chunk vectors and, with Partial FC or a 16-bit weight, k·chunk × D gathered rows (twice in the backward); per
  chunk and row, partial sums; the backward's grad_x partials, min(chunks, 4·threads) × N × D, and grad_x.  CUDA
  (csrc/cuda/fused_lse_cuda.cpp): the backward's grad_x partials, capped at 64 MiB (or one N × D split), and grad_x.
* gathered: the all-gathered embeddings (N·D·e) and labels (N·8), and what the step keeps of them for the backward:
  the normalized embeddings (N·D·acc), each row's target rows of W (N·k·D·e) and about 32 per-row vectors.
* communication: the backward's embedding-gradient buffer (N·D·acc, all-reduced on gloo, reduce-scattered on
  NCCL) and the all-gathered per-row log-sum-exps of every rank (world·N·acc).  NCCL's own channel buffers are not
  counted.
* partial_fc: the sample (``sample_rate < 1``): a random score per local class, its top-k and the sorted index
  list, and on the CPU a byte per local class (the repeated-index check).

Peak = weight + gradient + optimizer_state + the larger of optimizer_step and the backward's transients (gathered +
partial_fc + the larger of workspace and communication): ``opt.step()`` runs after the backward has freed its
scratch, and the op's scratch is freed before the embedding gradient is communicated.  The backbone,
the CUDA context and allocator fragmentation are not included.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

__all__ = ["HeadMemoryPlan", "choose_chunk", "memory_plan"]

OPTIMIZERS = ("sgd", "adamw", "adamw_fused", "none")
DEVICES = ("cuda", "cpu")
# per-row vectors of one step (labels, masks, cosines, logits, norms, the loss, their gradients), 8 bytes each: an
# estimate from _forward's O(N) tensors, small beside the N x D terms
_ROW_VECTORS = 32
_CUDA_GRAD_X_PARTIALS = 64 << 20  # csrc/cuda/fused_lse_cuda.cpp: the backward's per-split dX partials, capped


def choose_chunk(batch: int, k: int, n: int, elem_size: int) -> int:
    """Classes per chunk of the CPU kernels: csrc/cpu/fused_lse_cpu.cpp ``choose_chunk``, the same formula."""
    cols = (2 << 20) // max(1, batch * k * elem_size)
    cols = min(max(cols, 256), 8192)
    cols = min(cols, max((n + 15) // 16, 64))
    cols = (cols + 15) // 16 * 16
    return max(1, min(cols, n))


def _aligned(n: int) -> int:
    return (n + 15) // 16 * 16


def _cpu_workspace(N: int, D: int, k: int, columns: int, acc: int, threads: int, gathers: bool) -> int:
    """Bytes of the CPU op's scratch at its peak (the backward; the forward's partials are smaller)."""
    chunk = choose_chunk(N, k, columns, acc)
    chunks = -(-columns // chunk)
    nr = k * chunk
    per_thread = _aligned(N * nr) + 3 * _aligned(nr) + (2 * _aligned(nr * D) if gathers else 0)
    slices = max(1, min(threads, chunks))
    groups = min(chunks, 4 * max(1, threads))
    backward = (chunks * N + slices * per_thread + groups * N * D + N * D + 2 * N) * acc
    forward_per_thread = per_thread - (_aligned(nr * D) if gathers else 0)
    forward = (3 * chunks * N + slices * forward_per_thread + N) * acc + (chunks + 1) * N * 8
    return max(backward, forward)


@dataclasses.dataclass(frozen=True)
class HeadMemoryPlan:
    """Bytes per rank of one training step (the rank with the most rows), by item; see the module docstring."""

    num_classes: int
    embedding_size: int
    world_size: int
    batch_per_rank: int
    dtype: torch.dtype
    optimizer: str
    sample_rate: float
    subcenters: int
    device: str
    rows: int  # weight rows on the largest rank (classes × sub-centers)
    items: dict  # item -> bytes

    @property
    def persistent(self) -> int:
        """weight + gradient + optimizer state: what every step holds from its backward to the next zero_grad."""
        return self.items["weight"] + self.items["gradient"] + self.items["optimizer_state"]

    @property
    def transient(self) -> int:
        """The larger of the backward's and the optimizer step's temporaries (they never coexist).  In the backward,
        the op's scratch is freed before the embedding gradient's collective buffer is formed."""
        items = self.items
        backward = items["gathered"] + items["partial_fc"] + max(items["workspace"], items["communication"])
        return max(backward, items["optimizer_step"])

    @property
    def total(self) -> int:
        return self.persistent + self.transient

    def largest_num_classes(self, device_memory: float) -> int:
        """The largest num_classes whose plan (the other arguments as here) fits in ``device_memory`` bytes per rank
        (0: not even one class per rank)."""
        return largest_num_classes(
            device_memory,
            embedding_size=self.embedding_size,
            world_size=self.world_size,
            batch_per_rank=self.batch_per_rank,
            dtype=self.dtype,
            optimizer=self.optimizer,
            sample_rate=self.sample_rate,
            subcenters=self.subcenters,
            device=self.device,
        )

    def table(self) -> str:
        """The items, one a line, in MiB / GiB."""
        lines = [f"{name:16s}{_size(value):>12s}" for name, value in self.items.items()]
        lines.append(f"{'total (peak)':16s}{_size(self.total):>12s}")
        return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def memory_plan(
    num_classes: int,
    embedding_size: int,
    world_size: int,
    batch_per_rank: int,
    dtype: torch.dtype = torch.float32,
    optimizer: str = "sgd",
    sample_rate: float = 1.0,
    *,
    subcenters: int = 1,
    device: str = "cuda",
    threads: Optional[int] = None,
) -> HeadMemoryPlan:
    """Bytes per rank of one training step of ``DistributedMarginLoss(margin, embedding_size, num_classes,
    sample_rate)`` on ``world_size`` ranks, each with ``batch_per_rank`` embeddings, weight dtype ``dtype``.

    optimizer: "sgd" (with momentum), "adamw" (torch's default implementation for ``device``), "adamw_fused"
    (``fused=True``) or "none".  device: "cuda" or "cpu" (the fused op's scratch and AdamW's temporaries differ);
    threads: the CPU op's threads (default torch.get_num_threads()).  ``.items`` holds the bytes by item,
    ``.total`` the peak, ``.largest_num_classes(device_memory)`` the largest head that fits."""
    for name, value in (
        ("num_classes", num_classes),
        ("embedding_size", embedding_size),
        ("world_size", world_size),
        ("batch_per_rank", batch_per_rank),
        ("subcenters", subcenters),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"memory_plan: {name} must be an int >= 1, got {value!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"memory_plan: dtype must be a floating torch.dtype, got {dtype!r}")
    if optimizer is None:
        optimizer = "none"
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"memory_plan: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if not isinstance(sample_rate, (int, float)) or not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"memory_plan: sample_rate must be in (0, 1], got {sample_rate!r}")
    if device not in DEVICES:
        raise ValueError(f"memory_plan: device must be one of {DEVICES}, got {device!r}")
    threads = torch.get_num_threads() if threads is None else threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"memory_plan: threads must be an int >= 1, got {threads!r}")

    e = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    k, D, world = subcenters, embedding_size, world_size
    num_local = -(-num_classes // world)  # the first ranks own one class more
    R = num_local * k
    N = world * batch_per_rank
    sampled = sample_rate < 1.0
    # Partial FC keeps max(int(rate · num_local), positives) classes; the positives are at most N
    columns = min(num_local, max(int(sample_rate * num_local), min(N, num_local))) if sampled else num_local
    gathers = sampled or dtype in (torch.float16, torch.bfloat16)

    weight = R * D * e
    state = {"sgd": 1, "adamw": 2, "adamw_fused": 2, "none": 0}[optimizer] * weight
    step = {"adamw": 2 if device == "cpu" else 1}.get(optimizer, 0) * weight
    if device == "cpu":
        workspace = _cpu_workspace(N, D, k, columns, acc, threads, gathers)
    else:
        workspace = max(_CUDA_GRAD_X_PARTIALS, N * D * acc) + N * D * e
    gathered = N * D * e + N * 8 + N * D * acc + N * k * D * e + _ROW_VECTORS * N * 8
    communication = N * D * acc + world * N * acc
    partial_fc = 0
    if sampled and columns < num_local:
        partial_fc = num_local * 4 + columns * (4 + 8 + 8 + 8 + 8) + (num_local if device == "cpu" else 0)
    items = {
        "weight": weight,
        "gradient": weight,
        "optimizer_state": state,
        "optimizer_step": step,
        "workspace": workspace,
        "gathered": gathered,
        "communication": communication,
        "partial_fc": partial_fc,
    }
    return HeadMemoryPlan(
        num_classes, D, world, batch_per_rank, dtype, optimizer, float(sample_rate), k, device, R, items
    )


def largest_num_classes(device_memory: float, **kwargs) -> int:
    """The largest num_classes whose ``memory_plan(num_classes, **kwargs).total`` fits in ``device_memory`` bytes."""

    def fits(c: int) -> bool:
        return memory_plan(c, **kwargs).total <= device_memory

    world = kwargs["world_size"]
    if not fits(1):
        return 0
    lo, hi = 1, world
    while fits(hi):  # the total grows with num_classes: double, then bisect
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
