"""Class-parallel margin softmax over torch.distributed, with Partial FC class sampling.

Each rank owns a contiguous shard of the classes (rank r: ``num_classes // world + (r < num_classes % world)``
classes, starting where rank r − 1's end) and keeps only those rows of W.  One step, for the global batch
(all ranks' embeddings and labels gathered, N rows):

1. every rank normalizes the gathered embeddings X and computes the target cosine c_iy of the rows whose
   label it owns; one all-reduce (sum, no gradient) gives every rank all of them, so CurricularFace's
   threshold cos(θ_iy + m) and EMA ``t``, and margins that look across rows (ElasticFace+), see the
   whole batch, identically everywhere;
2. the owner computes the row's target logit z_iy (the margin, docs/DESIGN.md §3 pre-pass, from its own cosine
   with gradient) and any per-row extra loss term (MagFace); a second all-reduce shares them;
3. the fused op runs on the local shard (the target column only on the owner, ``labels = -1`` elsewhere)
   and returns the shard's log-sum-exp per row; one all-gather of those gives the global log-sum-exp;
4. loss_i = LSE_i − z_iy (+ the extra term), averaged over the global batch: the same value on every rank.

Margins that draw random numbers (ElasticFace) equal single-process training when their generator is in
the same state on every rank (seed it identically); otherwise each row simply uses its owner's draw.

Rank handshake.  Every forward's first collective (a fixed-size all-gather of the batch sizes) also carries
a fingerprint of this rank's head: embedding_size, num_classes, the margin's class and parameters (with
CurricularFace's t and curricular_alpha), sub-centers, the weight's dtype, the products' dtype (compute_dtype,
PartialFC_V2's fp16, autocast), the resolved backend, deterministic, train / eval, sample_rate, reduction,
ignore_index and the filtering threshold.  Ranks that disagree (built with different arguments, or after
loading different checkpoints or assigning different margins) raise the same ValueError on every rank, naming
each difference and every rank's value, before any collective whose size depends on the configuration (where
gloo would abort).  A single process (no process group, or world size 1) has nothing to compare and skips it: no
host round trip, so torch.compile(fullgraph=True) traces that head whole.

Autograd.  The loss is *replicated*: every rank computes the same function of the collectives' outputs and
calls ``backward`` with the same upstream gradient.  So the backward of the all-reduce / all-gather above
needs no communication (each rank's contribution gets its own copy of the gradient, or its slice of it),
and all rank-local work (the op, the owner's target logit) sees exactly its share of dL.  The only
backward collective is the embedding all-gather's: the gradient of X is the sum over ranks of their
shares, and each rank keeps its own rows.  That gradient is multiplied by ``world`` (``embedding_grad_scale``)
because DistributedDataParallel *averages* the backbone's gradients over ranks: world × ∂L/∂x_local,
averaged, is exactly single-process training on the global batch.  The shard's weight gradient is
∂L/∂W_shard unscaled — keep the head out of DDP (each rank's shard is a different tensor).

Checkpoints.  Every ``state_dict`` records in its extra state what ``weight`` holds (num_classes, sub-centers,
embedding_size, world size, rank, the class range, whole head or shard); ``load_state_dict`` checks it and names
each difference (docs/DESIGN.md §6.4).  ``get_state_dict`` marks the head's rows and their optimizer states for
torch.distributed.checkpoint, which then saves and loads them sharded, on any world size (§6.5).

Partial FC (``sample_rate < 1``, training mode): every rank keeps the classes of its shard that are positive
in the global batch plus a uniformly random subset of the others, ``max(int(sample_rate·num_local),
#positives)`` classes in all, drawn from a generator seeded by (seed, rank, step) — reproducible and
resumable (the step is in ``state_dict``).  The index list goes to the kernels, which gather the rows
themselves (no copy of W[index]); unsampled rows get exactly zero gradient.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from . import ops
from ._validation import (
    REDUCTIONS,
    check_backend_fits,
    check_compute_dtype,
    check_label_values,
    check_number,
    compute_dtype_problem,
    label_dtype_problem,
)
from .capabilities import BACKENDS
from .functional import _DenseGradLast, compute_dtype_on, resolve_precision
from .head_memory import HeadMemoryPlan, memory_plan
from .loss_assembly import make_stats, reduce_loss, row_losses
from .margins import (
    FILTER_OFF,
    NORM_EPS,
    CurricularFace,
    Margin,
    accumulation_dtype,
    step_spec,
    subcenter_cosines,
)

__all__ = ["DistributedMarginLoss", "HeadMemoryPlan", "get_state_dict", "legacy_shard", "memory_plan", "shard_range"]


# ----------------------------------------------------------------------------------------------------------
# sharding and collectives


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(class_start, num_local) of ``rank``: the first ``num_classes % world`` ranks own one class more."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp.contiguous(), group=group)


def _gather_rows(local: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenation over ranks of tensors whose first dimension may differ (``sizes``), no autograd."""
    world = len(sizes)
    if world == 1:
        return local
    rows = max(sizes)
    padded = local
    if local.shape[0] < rows:
        padded = torch.cat([local, local.new_zeros((rows - local.shape[0],) + tuple(local.shape[1:]))])
    out = local.new_empty((world * rows,) + tuple(local.shape[1:]))
    _all_gather_flat(out, padded, group)
    if all(s == rows for s in sizes):
        return out
    return torch.cat([out[r * rows : r * rows + sizes[r]] for r in range(world)])


# ----------------------------------------------------------------------------------------------------------
# checkpoint layout: every state_dict says which head, world and class range its weight holds

_LAYOUT_FORMAT = 1


def _classes(start: int, n: int) -> str:
    return f"classes {start}..{start + n - 1}" if n else "no class"


def _labels_out_of_range(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    labels = labels.long()  # compared as int64, as check_label_values does
    return ((labels != ignore_index) & ((labels < 0) | (labels >= num_classes))).sum()


def _shares_a_larger_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() > t.numel() * t.element_size()


def legacy_shard(
    state_dict: dict, *, num_classes: int, world_size: int, rank: int, subcenters: int = 1, prefix: str = ""
) -> dict:
    """A per-rank checkpoint saved without a layout record (by marginops before it wrote one, or insightface's
    ``PartialFC_V2``), declared as rank ``rank``'s shard of a ``num_classes`` head on ``world_size`` ranks:
    a shallow copy with that record added, which ``load_state_dict`` then checks like any other.  Such a
    checkpoint is refused without it, as its row count alone cannot tell which classes it holds."""
    weight = state_dict[prefix + "weight"]
    start, n = shard_range(num_classes, world_size, rank)
    if weight.dim() != 2 or weight.shape[0] != n * subcenters:
        raise ValueError(
            f"legacy_shard: rank {rank} of {world_size} holds {n} of {num_classes} classes x {subcenters} "
            f"sub-centers = {n * subcenters} rows, but weight has shape {tuple(weight.shape)}"
        )
    extra = state_dict.get(prefix + "_extra_state")
    extra = dict(extra) if isinstance(extra, dict) else {}
    extra["layout"] = {
        "format": _LAYOUT_FORMAT,
        "num_classes": num_classes,
        "subcenters": subcenters,
        "embedding_size": weight.shape[1],
        "world_size": world_size,
        "rank": rank,
        "whole": False,
        "class_start": start,
        "num_local": n,
    }
    out = dict(state_dict)
    out[prefix + "_extra_state"] = extra
    return out


def get_state_dict(model: nn.Module, optimizers, *, submodules=None, options=None):
    """``torch.distributed.checkpoint.state_dict.get_state_dict(model, optimizers)`` for a model that holds
    DistributedMarginLoss / PartialFC_V2 heads: the same (model, optimizer) state dicts, with each head's weight
    and every optimizer state shaped like it (SGD's momentum, Adam(W)'s moments) marked as this rank's rows of the
    whole (num_classes·k, D) head.  ``dcp.save`` then writes one global tensor each, and ``dcp.load`` into the
    state dicts this returns on another run, of any world size, reads each rank's rows only; finish with
    ``torch.distributed.checkpoint.state_dict.set_state_dict``.  Everything else is as torch returns it."""
    from torch.distributed.checkpoint import state_dict as dcp_state_dict

    model_sd, optim_sd = dcp_state_dict.get_state_dict(model, optimizers, submodules=submodules, options=options)
    # the keys torch gives a parameter (without DDP's "module." and torch.compile's "_orig_mod." prefixes)
    fqns = getattr(dcp_state_dict, "_get_fqns", lambda model, name: {name})
    for name, head in model.named_modules():
        if not isinstance(head, DistributedMarginLoss):
            continue
        for fqn in fqns(model, f"{name}.weight" if name else "weight"):
            prefix = fqn[: -len("weight")]
            if isinstance(model_sd.get(fqn), torch.Tensor):
                model_sd[fqn] = head._global_shard(model_sd[fqn])
            extra = model_sd.get(prefix + "_extra_state")
            if isinstance(extra, dict):
                model_sd[prefix + "_extra_state"] = dict(extra, layout=head._layout(sharded=True))
            _mark_optimizer_states(head, optim_sd, fqn)
    return model_sd, optim_sd


def _mark_optimizer_states(head: "DistributedMarginLoss", optim_sd: dict, fqn: str) -> None:
    """Mark the optimizer states of ``fqn`` shaped like the head's weight, nested ({"state": {fqn: {...}}}) or
    flattened ("state.<fqn>.<name>", StateDictOptions(flatten_optimizer_state_dict=True))."""
    shape = tuple(head.weight.shape)

    def mark(value):
        return head._global_shard(value) if isinstance(value, torch.Tensor) and tuple(value.shape) == shape else value

    states = optim_sd.get("state")
    if isinstance(states, dict) and isinstance(states.get(fqn), dict):
        states[fqn] = {key: mark(value) for key, value in states[fqn].items()}
    for key in [key for key in optim_sd if isinstance(key, str) and key.startswith(f"state.{fqn}.")]:
        optim_sd[key] = mark(optim_sd[key])


# ----------------------------------------------------------------------------------------------------------
# rank handshake: every rank must have built the head the same way

# A fixed-length float64 fingerprint of the head's configuration, gathered with the batch sizes in one
# all-gather of fixed size: ranks that disagree must never reach a collective whose sizes differ (gloo
# aborts the process on that), and every rank must raise the same error.
_HANDSHAKE_MAGIC = 0x6D6F6832  # "moh2"; a rank running another layout shows up as a mismatch of this slot
_MARGIN_PARAM_SLOTS = 8
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_COMPUTE_FIELD = "compute dtype (compute_dtype, PartialFC_V2's fp16 or autocast)"
_HEAD_FIELDS = (
    "handshake layout",
    "embedding_size",
    "num_classes",
    "sub-centers (margin.subcenters)",
    "weight dtype",
    "sample_rate",
    "margin",
    "reduction",
    "ignore_index",
    "interclass_filtering_threshold",
    _COMPUTE_FIELD,
    "backend (resolved)",
    "deterministic",
    "training mode",
    "curricular_alpha",
)
_FINGERPRINT_SIZE = len(_HEAD_FIELDS) + _MARGIN_PARAM_SLOTS + 1
# margin parameters that are device tensors (CurricularFace's t), gathered without a host read of their own
_DEVICE_SLOTS = 2


def _crc(text: str) -> float:
    return float(zlib.crc32(text.encode()))


def _margin_classes() -> dict:
    found, todo = {}, [Margin]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found[sub.__name__] = sub
            todo.append(sub)
    return found


def _margin_code(margin: Margin) -> float:
    names = sorted(_margin_classes())
    name = type(margin).__name__
    return float(names.index(name)) if name in names else 1000.0 + _crc(type(margin).__qualname__)


def _margin_name(code: float) -> str:
    names = sorted(_margin_classes())
    return names[int(code)] if code < len(names) else f"a custom margin class (fingerprint {int(code - 1000)})"


def _margin_params(margin: Margin) -> list:
    """(name, value, raw) of the spec's numeric, boolean and string fields (not generators).  A one-element tensor
    (CurricularFace's t buffer) stays a tensor, raw None: the handshake reads it in its one host read."""
    out = []
    for field in dataclasses.fields(margin) if dataclasses.is_dataclass(margin) else ():
        value = getattr(margin, field.name)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out.append((field.name, value.detach(), None))
        elif isinstance(value, (bool, int, float)):
            out.append((field.name, float(value), value))
        elif isinstance(value, str):
            out.append((field.name, _crc(value), value))
    return out


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _handshake_problem(fingerprints: list, param_names: list) -> Optional[str]:
    """The differences between the ranks' fingerprints (rows of floats), or None; the same text on every rank
    (``param_names``: the margin's (field, is a string), the same on every rank when the margin classes agree)."""
    first = fingerprints[0]
    differ = [i for i in range(_FINGERPRINT_SIZE) if any(not _same(fp[i], first[i]) for fp in fingerprints)]
    if not differ:
        return None
    margin_slot = _HEAD_FIELDS.index("margin")
    if margin_slot in differ:  # other margin classes: their parameters are not comparable
        differ = [i for i in differ if i < len(_HEAD_FIELDS)]

    def show(i, value):
        field = _HEAD_FIELDS[i] if i < len(_HEAD_FIELDS) else None
        if field in ("weight dtype", _COMPUTE_FIELD):
            return str(_DTYPES[int(value)]) if 0 <= value < len(_DTYPES) else f"dtype code {value:g}"
        if field == "backend (resolved)":
            return repr(BACKENDS[int(value)]) if 0 <= value < len(BACKENDS) else f"code {value:g}"
        if field == "training mode":
            return "train" if value else "eval"
        if field == "deterministic":
            return str(bool(value))
        if field == "margin":
            return _margin_name(value)
        if field == "reduction":
            return repr(REDUCTIONS[int(value)]) if 0 <= value < len(REDUCTIONS) else f"code {value:g}"
        if i == 0:
            return f"{int(value):#x}"
        j = i - len(_HEAD_FIELDS)
        if 0 <= j < len(param_names) and param_names[j][1]:
            return f"a string with crc32 {int(value)}"
        return f"{value:.17g}"

    lines = []
    for i in differ:
        if i < len(_HEAD_FIELDS):
            name = _HEAD_FIELDS[i]
        elif i < len(_HEAD_FIELDS) + _MARGIN_PARAM_SLOTS:
            j = i - len(_HEAD_FIELDS)
            name = f"margin.{param_names[j][0]}" if j < len(param_names) else f"margin parameter #{j}"
        else:
            name = "further margin parameters"
        values = ", ".join(f"rank {r}: {show(i, fp[i])}" for r, fp in enumerate(fingerprints))
        lines.append(f"{name} ({values})")
    return (
        "DistributedMarginLoss: the ranks built the head differently; every rank must construct it with the same "
        "arguments, load the same checkpoint and be in the same mode (train / eval). Differences: " + "; ".join(lines)
    )


class _GatherEmbeddings(torch.autograd.Function):
    """All-gather of the local embeddings; backward: sum of every rank's gradient, own rows, × grad_scale."""

    @staticmethod
    def forward(ctx, local, sizes, rank, group, grad_scale):
        ctx.sizes, ctx.rank, ctx.group, ctx.grad_scale = sizes, rank, group, grad_scale
        return _gather_rows(local, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, rank, group = ctx.sizes, ctx.rank, ctx.group
        world, rows = len(sizes), max(sizes)
        grad = grad.contiguous()
        if world > 1:
            if any(s != rows for s in sizes):
                chunks = torch.split(grad, sizes)
                grad = torch.cat(
                    [
                        torch.cat([c, c.new_zeros((rows - c.shape[0],) + tuple(c.shape[1:]))])
                        if c.shape[0] < rows
                        else c
                        for c in chunks
                    ]
                )
            if dist.get_backend(group) == "nccl":
                mine = grad.new_empty((rows,) + tuple(grad.shape[1:]))
                fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
                fn(mine, grad, group=group)
            else:  # gloo: an all-reduce is supported everywhere; keep our rows
                dist.all_reduce(grad, group=group)
                mine = grad[rank * rows : (rank + 1) * rows]
            grad = mine[: sizes[rank]]
        if ctx.grad_scale != 1.0:
            grad = grad * ctx.grad_scale
        return grad, None, None, None, None


class _ReplicatedSum(torch.autograd.Function):
    """All-reduce (sum) whose result feeds a loss replicated on every rank: the backward is the identity."""

    @staticmethod
    def forward(ctx, local, group):
        out = local.clone()
        if _world(group)[0] > 1:
            dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReplicatedStack(torch.autograd.Function):
    """All-gather into (world, ...) feeding a replicated loss: the backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, local, rank, world, group):
        ctx.rank = rank
        if world == 1:
            return local.unsqueeze(0).clone()
        out = local.new_empty((world,) + tuple(local.shape))
        _all_gather_flat(out.view(-1), local.contiguous().view(-1), group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None, None, None


# ----------------------------------------------------------------------------------------------------------
# the module


class DistributedMarginLoss(nn.Module):
    """Margin softmax loss with the class weights sharded over the ranks of ``process_group``.

    ``margin``: a marginops margin spec (ArcFace(), CosFace(), CurricularFace(), ...).  ``forward(
    local_embeddings, local_labels)`` takes this rank's batch (batch sizes may differ between ranks) and
    returns the loss over the *global* batch — the same scalar on every rank; call ``backward`` on it on
    every rank.  Embeddings are cast to the weight's dtype, and so is the loss; ``compute_dtype`` (or
    torch.autocast) bf16 / fp16 on a float32 weight runs the products in that dtype (mixed precision, see
    margin_cross_entropy).  Without an initialized process group it runs as a single rank (a plain head, with
    Partial FC if asked).

    Attributes: ``weight`` (num_local·k, embedding_size) this rank's rows (k = margin.subcenters),
    ``class_start``, ``num_local``, ``weight_index`` (the local class ids sampled in the last training
    step, None without sampling), ``t`` (with CurricularFace only: its EMA, a float64 buffer identical on
    every rank), ``sample_step`` (training steps sampled so far; saved in ``state_dict``).

    sample_rate: Partial FC, see the module docstring.  embedding_grad_scale: factor on the embeddings'
    gradient, default the world size (right under DistributedDataParallel, which averages gradients);
    pass 1.0 if your backbone gradients are summed instead.  interclass_filtering_threshold,
    ignore_index, reduction: as in ``marginops.margin_cross_entropy`` ("mean" is over the global batch).
    SphereFace's λ and CurricularFace's s, m come from ``margin``; assign ``module.margin`` to change them
    (e.g. to anneal SphereFace's λ).  Keep this module out of DistributedDataParallel: its weight differs
    between ranks and must not be averaged.
    """

    def __init__(
        self,
        margin: Margin,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        process_group=None,
        backend: str = "auto",
        *,
        seed: int = 0,
        embedding_grad_scale: Optional[float] = None,
        interclass_filtering_threshold: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        curricular_alpha: float = 0.01,
        deterministic: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if not isinstance(margin, Margin):
            raise TypeError(
                f"margin must be a marginops margin spec (e.g. marginops.ArcFace()), got {type(margin).__name__}"
            )
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(f"embedding_size and num_classes must be >= 1, got {embedding_size}, {num_classes}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        check_number("curricular_alpha", curricular_alpha, 0.0, 1.0, why="the EMA rate of CurricularFace's t")
        check_compute_dtype(compute_dtype)
        self.compute_dtype = compute_dtype
        check_number("interclass_filtering_threshold", interclass_filtering_threshold, why="<= 0 turns filtering off")
        self.margin = margin
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        self.process_group = process_group
        self.backend = backend
        self.seed = int(seed)
        self.interclass_filtering_threshold = interclass_filtering_threshold
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.curricular_alpha = curricular_alpha
        self.deterministic = deterministic
        self.world_size, self.rank = _world(process_group)
        self.embedding_grad_scale = float(self.world_size if embedding_grad_scale is None else embedding_grad_scale)
        self.class_start, self.num_local = shard_range(num_classes, self.world_size, self.rank)
        # insightface's initialization; the scale is irrelevant after normalization
        self.weight = nn.Parameter(torch.empty(self.num_local * margin.subcenters, embedding_size).normal_(0.0, 0.01))
        if isinstance(margin, CurricularFace):  # only then: other heads keep insightface's state_dict ({"weight"})
            self._add_t(margin)
        self.sample_step = 0
        self.weight_index: Optional[torch.Tensor] = None
        self._generators: dict = {}

    # -- state ---------------------------------------------------------------------------------------------

    def _layout(self, whole: bool = False, sharded: bool = False) -> dict:
        """What a state_dict's ``weight`` holds, checked by load_state_dict (see _layout_rows).  ``sharded``: the
        weight is this rank's rows of the whole head, placed by its DCP offsets (get_state_dict); the record is then
        the same on every rank (DCP saves one copy of an object) and the rows are named by the tensor."""
        start, n = (0, self.num_classes) if whole else (self.class_start, self.num_local)
        return {
            "format": _LAYOUT_FORMAT,
            "num_classes": self.num_classes,
            "subcenters": self.margin.subcenters,
            "embedding_size": self.embedding_size,
            "world_size": self.world_size,
            "rank": None if sharded else self.rank,
            "whole": whole,
            "sharded": sharded,
            "class_start": None if sharded else start,
            "num_local": None if sharded else n,
        }

    def _global_shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (this rank's rows of the weight, or of an optimizer state shaped like it) as DCP's
        CheckpointableTensor: an alias with the global shape and this rank's offset in it, so that dcp.save writes
        one (num_classes·k, D) tensor and dcp.load reads into it exactly this rank's rows, on any world size."""
        k = self.margin.subcenters
        alias = tensor.detach()  # a new tensor object on the same storage: the attributes stay off the original
        alias.global_shape = (self.num_classes * k, self.embedding_size)
        alias.global_offsets = ((self.class_start * k, 0),)
        alias.local_offsets = ((0, 0),)
        alias.local_sizes = (tuple(tensor.shape),)
        return alias

    def get_extra_state(self):
        return {"sample_step": self.sample_step, "layout": self._layout()}

    def set_extra_state(self, state):
        self.sample_step = int(state.get("sample_step", 0))

    def full_state_dict(self) -> dict:
        """The whole head, for resharding: ``state_dict()`` with ``weight`` gathered from every rank (all
        num_classes·k rows in class order), the same on every rank — a collective, call it on every rank.
        ``load_state_dict`` takes it on any world size (and without a process group), each rank keeping its
        own shard; the Partial FC sample sequence then depends on the new ranks (seeded by rank)."""
        state = self.state_dict()
        k = self.margin.subcenters
        sizes = [shard_range(self.num_classes, self.world_size, r)[1] * k for r in range(self.world_size)]
        with torch.no_grad():
            state["weight"] = _gather_rows(self.weight.detach(), sizes, self.process_group).clone()
        extra = dict(state.get("_extra_state") or {})
        extra["layout"] = self._layout(whole=True)
        state["_extra_state"] = extra
        return state

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key, extra_key = prefix + "weight", prefix + "_extra_state"
        weight, extra = state_dict.get(key), state_dict.get(extra_key)
        layout = extra.get("layout") if isinstance(extra, dict) else None
        if isinstance(weight, torch.Tensor):
            if layout is None:
                problem, rows = self._legacy_rows(weight)
            else:
                problem, rows = self._layout_rows(layout, weight)
            if problem is not None:  # nothing loaded: a refused checkpoint leaves the head as it was
                error_msgs.append(f"{type(self).__name__}: {problem}")
                return
            if rows is not None:
                weight = weight[rows]
            if local_metadata.get("assign_to_params_buffers", False) and _shares_a_larger_storage(weight):
                weight = weight.clone()  # assign=True: keep a copy of this rank's rows, not a view of the whole head
            state_dict = dict(state_dict)
            state_dict[key] = weight
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if layout is None and extra_key in missing_keys:  # a weight-only checkpoint (insightface's, or hand-made)
            missing_keys.remove(extra_key)

    def _where(self) -> str:
        k = self.margin.subcenters
        head = f"num_classes {self.num_classes}" + (f" x {k} sub-centers" if k > 1 else "")
        return (
            f"rank {self.rank} of {self.world_size}, {_classes(self.class_start, self.num_local)} of a head with "
            f"{head}, embedding_size {self.embedding_size}"
        )

    def _legacy_rows(self, weight: torch.Tensor):
        """(problem, rows to keep) for a weight without a layout record (saved before marginops recorded one, or by
        insightface): loaded only where its row count has one reading, the whole head."""
        k, rows_here = self.margin.subcenters, self.weight.shape[0]
        whole = self.num_classes * k
        if weight.dim() != 2 or weight.shape[1] != self.embedding_size:
            return (
                f"weight has shape {tuple(weight.shape)}, this head's rows have embedding_size {self.embedding_size} "
                f"({self._where()})"
            ), None
        rows = weight.shape[0]
        if rows == whole:  # the whole head (or a one-rank run's shard, the same rows)
            return None, self._shard_rows()
        if rows == rows_here:
            return (
                f"weight has {rows} rows and no layout record (a checkpoint saved before marginops recorded one, or "
                f"insightface's): it may be this rank's shard ({self._where()}), or a shard of another world size "
                f"or head with as many rows. If it is this rank's shard from a run on {self.world_size} ranks, load "
                f"marginops.distributed.legacy_shard(state_dict, num_classes={self.num_classes}, world_size="
                f"{self.world_size}, rank={self.rank}" + (f", subcenters={k}" if k > 1 else "") + "); to reshard, "
                "load the whole head (full_state_dict())"
            ), None
        return (
            f"weight has {rows} rows and no layout record; this rank's shard has {rows_here} rows and the whole head "
            f"{whole} ({self._where()})"
        ), None

    def _layout_rows(self, layout: dict, weight: torch.Tensor):
        """(problem, rows to keep) for a weight saved with its layout record: every difference named."""
        k = self.margin.subcenters
        if not isinstance(layout, dict) or layout.get("format") != _LAYOUT_FORMAT:
            fmt = layout.get("format") if isinstance(layout, dict) else layout
            return f"the checkpoint's layout record has format {fmt!r}; this marginops reads {_LAYOUT_FORMAT}", None
        ours = {"num_classes": self.num_classes, "subcenters": k, "embedding_size": self.embedding_size}
        differ = [
            f"{name} {layout.get(name)!r} in the checkpoint, {value} here"
            for name, value in ours.items()
            if layout.get(name) != value
        ]
        if differ:
            return "the checkpoint holds another head: " + "; ".join(differ) + f" ({self._where()})", None
        if layout.get("sharded"):
            return self._sharded_rows(weight), None
        saved_k = layout["subcenters"]
        start, n = int(layout["class_start"]), int(layout["num_local"])
        if tuple(weight.shape) != (n * saved_k, self.embedding_size):
            return (
                f"weight has shape {tuple(weight.shape)} but its layout record says {n} classes x {saved_k} "
                f"sub-centers of embedding_size {self.embedding_size}"
            ), None
        if layout.get("whole") or (start, n) == (0, self.num_classes):  # a whole head, or a one-rank run's shard
            return None, self._shard_rows()
        if (layout["world_size"], layout["rank"]) != (self.world_size, self.rank):
            differ = [
                f"{name} {layout[name]} in the checkpoint, {value} here"
                for name, value in (("world_size", self.world_size), ("rank", self.rank))
                if layout[name] != value
            ]
            return (
                f"the checkpoint is the shard of rank {layout['rank']} of {layout['world_size']} "
                f"({_classes(start, n)}), this is {self._where()}: " + "; ".join(differ) + ". A per-rank shard "
                "loads on the rank and world size that saved it; to reshard, save the whole head with full_state_dict()"
            ), None
        if (start, n) != (self.class_start, self.num_local):  # same rank and world: a corrupt or hand-made record
            return (
                f"the checkpoint's shard holds {_classes(start, n)}, this rank's "
                f"{_classes(self.class_start, self.num_local)}"
            ), None
        return None, None

    def _sharded_rows(self, weight: torch.Tensor) -> Optional[str]:
        """A DCP record: the weight must be the tensor get_state_dict marked for this rank, which dcp.load filled."""
        k = self.margin.subcenters
        offsets = getattr(weight, "global_offsets", None)
        if offsets == ((self.class_start * k, 0),) and tuple(weight.shape) == tuple(self.weight.shape):
            return None
        found = "no global offsets" if offsets is None else f"global offsets {offsets}"
        return (
            f"the checkpoint's weight is a shard of a DCP checkpoint (marginops.distributed.get_state_dict), and "
            f"this tensor has {found} and shape {tuple(weight.shape)}, not this rank's rows "
            f"{self.class_start * k}..{(self.class_start + self.num_local) * k - 1} ({self._where()}): dcp.load it "
            "into the state dicts of marginops.distributed.get_state_dict on this run, then set_state_dict"
        )

    def _shard_rows(self) -> slice:
        k = self.margin.subcenters
        return slice(self.class_start * k, (self.class_start + self.num_local) * k)

    def _add_t(self, margin: CurricularFace) -> None:
        # float64 so that the spec's t round-trips exactly; identical on every rank by construction
        self.register_buffer("t", torch.tensor(float(margin.t), dtype=torch.float64, device=self.weight.device))

    def current_margin(self) -> Margin:
        """The margin spec this step uses (CurricularFace with the module's t)."""
        margin = self._step_margin()
        if isinstance(margin, CurricularFace):
            return dataclasses.replace(margin, t=float(margin.t))
        return margin

    def _step_margin(self) -> Margin:
        """current_margin with CurricularFace's t as the buffer itself: no host read, so torch.compile traces it."""
        if not isinstance(self.margin, CurricularFace):
            return self.margin
        if not hasattr(self, "t"):  # margin switched to CurricularFace after construction
            self._add_t(self.margin)
        fields = {field.name: getattr(self.margin, field.name) for field in dataclasses.fields(self.margin)}
        fields["t"] = self.t.detach()
        return step_spec(type(self.margin), **fields)

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"rank={self.rank}/{self.world_size}, class_start={self.class_start}, num_local={self.num_local}, "
            f"sample_rate={self.sample_rate}, backend={self.backend!r}"
        )

    # -- helpers -------------------------------------------------------------------------------------------

    def _local_problem(self, embeddings, labels) -> Optional[str]:
        if not isinstance(embeddings, torch.Tensor) or not isinstance(labels, torch.Tensor):
            return "local_embeddings and local_labels must be torch.Tensors"
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            return (
                f"local_embeddings must be (batch, {self.embedding_size}), got shape {tuple(embeddings.shape)} "
                f"on rank {self.rank}"
            )
        if not embeddings.is_floating_point():
            return f"local_embeddings must be floating point, got {embeddings.dtype}"
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            return (
                f"local_labels must be 1-D with one entry per embedding row, got shape {tuple(labels.shape)} for "
                f"{embeddings.shape[0]} rows on rank {self.rank}"
            )
        if label_dtype_problem(labels) is not None:
            return label_dtype_problem(labels, "local_labels")
        if embeddings.device != self.weight.device or labels.device != self.weight.device:
            return (
                f"local_embeddings ({embeddings.device}), local_labels ({labels.device}) and the weight "
                f"({self.weight.device}) must be on one device"
            )
        return None

    def _backend_problem(self, backend: str) -> Optional[str]:
        """Why ``backend`` cannot run here, found before the handshake so that every rank raises (a kernel build
        that fails on one rank only would otherwise leave the others waiting in the next collective)."""
        try:
            check_backend_fits(self.backend, self.weight)  # the embeddings are cast to the weight's dtype, device
        except (TypeError, ValueError) as exc:
            return f"{exc} (rank {self.rank})"
        kind = {"cpu": "cpu", "cuda": "cuda", "cuda_fused": "cuda"}.get(backend)
        reason = ops._build_failure(kind) if kind is not None else ""
        return f"backend {backend!r} cannot run on rank {self.rank}: {reason}" if reason else None

    def _fingerprint(self, compute_dtype, backend: str) -> tuple[list, list]:
        """This rank's configuration as _FINGERPRINT_SIZE floats (see _HEAD_FIELDS), compared across ranks, and the
        (slot, 0-dim tensor) pairs of the slots whose value lives on the device (0.0 in the list until gathered)."""
        margin = self._step_margin()
        dtype = self.weight.dtype
        compute = compute_dtype or dtype
        head = [
            float(_HANDSHAKE_MAGIC),
            float(self.embedding_size),
            float(self.num_classes),
            float(margin.subcenters),
            float(_DTYPES.index(dtype)) if dtype in _DTYPES else 100.0 + _crc(str(dtype)),
            self.sample_rate,
            _margin_code(margin),
            float(REDUCTIONS.index(self.reduction)),
            float(self.ignore_index),
            float(self.interclass_filtering_threshold),
            float(_DTYPES.index(compute)) if compute in _DTYPES else 100.0 + _crc(str(compute)),
            float(BACKENDS.index(backend)) if backend in BACKENDS else 100.0 + _crc(backend),
            float(bool(self.deterministic)),
            float(self.training),
            # read only by CurricularFace: other heads built with another alpha train the same
            float(self.curricular_alpha) if isinstance(margin, CurricularFace) else 0.0,
        ]
        params = _margin_params(margin)
        values, on_device = [], []
        for i, (_, value, _) in enumerate(params[:_MARGIN_PARAM_SLOTS]):
            if isinstance(value, torch.Tensor) and len(on_device) < _DEVICE_SLOTS:
                on_device.append((len(head) + i, value))
                value = 0.0
            values.append(float(value))  # a further tensor: read here (no margin has one)
        values += [0.0] * (_MARGIN_PARAM_SLOTS - len(values))
        rest = _crc(repr([(name, raw) for name, _, raw in params[_MARGIN_PARAM_SLOTS:] if raw is not None]))
        return head + values + [rest], on_device

    def _handshake(
        self, rows: int, problem: Optional[str], bad_labels, group, world: int, device, compute_dtype, backend
    ) -> tuple[list, bool]:
        """(every rank's batch size, whether some rank has labels out of range), after checking that the ranks built
        the same head and that every rank's input is valid (a collective: the same error on every rank).

        The step's one host read: a fixed-size row per rank, [rows, valid, fingerprint, the device slots' indices,
        their values, this rank's count of labels out of range]; the last ones are device tensors (CurricularFace's
        t, the label check), so reading them costs no host synchronization of its own."""
        fingerprint, on_device = self._fingerprint(compute_dtype, backend)
        slots = [float(slot) for slot, _ in on_device] + [-1.0] * (_DEVICE_SLOTS - len(on_device))
        values = [value for _, value in on_device] + [torch.zeros(())] * (_DEVICE_SLOTS - len(on_device))
        values.append(bad_labels if bad_labels is not None else torch.zeros(()))
        host = torch.tensor([rows, int(problem is None)] + fingerprint + slots, dtype=torch.float64)
        measured = torch.stack([v.to(device=device, dtype=torch.float64).reshape(()) for v in values])
        info = torch.cat([host.to(device), measured])[None]
        infos = _gather_rows(info, [1] * world, group).tolist()
        fingerprints = []
        for row in infos:
            fp, tail = row[2 : 2 + _FINGERPRINT_SIZE], row[2 + _FINGERPRINT_SIZE :]
            for slot, value in zip(tail[:_DEVICE_SLOTS], tail[_DEVICE_SLOTS : 2 * _DEVICE_SLOTS]):
                if slot >= 0:
                    fp[int(slot)] = value
            fingerprints.append(fp)
        mismatch = _handshake_problem(
            fingerprints, [(n, isinstance(raw, str)) for n, _, raw in _margin_params(self.margin)]
        )
        if mismatch is not None:
            raise ValueError(mismatch)
        if problem is not None:
            raise ValueError(problem)
        if not all(row[1] for row in infos):
            bad = [r for r, row in enumerate(infos) if not row[1]]
            raise ValueError(f"DistributedMarginLoss: rank(s) {bad} passed invalid inputs (see the error there)")
        return [int(row[0]) for row in infos], any(row[-1] > 0 for row in infos)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        return self._generators[key]

    def _sample(self, local_labels: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
        """Sorted local class ids: every positive of the shard plus random others (Partial FC)."""
        device = self.weight.device
        positive = torch.unique(local_labels[owned])
        num_sample = max(int(self.sample_rate * self.num_local), positive.numel())
        if num_sample >= self.num_local:
            return torch.arange(self.num_local, device=device)
        gen = self._generator(device)
        # one stream per (seed, rank, step): reproducible, and resumable from the saved step
        gen.manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_000_007 + self.sample_step) % (1 << 63))
        score = torch.rand(self.num_local, generator=gen, device=device)
        score[positive] = 2.0
        return torch.topk(score, num_sample, sorted=False).indices.sort().values

    # -- forward -------------------------------------------------------------------------------------------

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor, return_stats: bool = False):
        """The loss over the global batch (the same value on every rank).  return_stats: also return
        ``MarginStats`` of the global batch (rows in rank order: this rank's rows are
        ``[sum(sizes[:rank]), sum(sizes[:rank + 1]))``), identical on every rank; ``predicted`` is the global
        class of the highest raw cosine over every shard's columns (the sampled ones under Partial FC)."""
        local_embeddings, compute, autocast_device = resolve_precision(
            local_embeddings, self.weight, self._products_dtype()
        )
        if autocast_device is None:
            return self._forward(local_embeddings, local_labels, return_stats, compute)
        with torch.autocast(autocast_device, enabled=False):
            return self._forward(local_embeddings, local_labels, return_stats, compute)

    def _products_dtype(self):
        """The products' dtype asked for outside autocast (None: the weight's)."""
        return self.compute_dtype

    def _forward(self, local_embeddings, local_labels, return_stats, compute_dtype):
        group, world, rank = self.process_group, self.world_size, self.rank
        weight = self.weight
        device = weight.device
        if isinstance(local_labels, torch.Tensor) and local_labels.dim() == 2 and local_labels.shape[1] == 1:
            local_labels = local_labels.reshape(-1)

        # 1. sizes, with a validity flag, so that one rank's bad input raises on every rank (no hang), and the
        # handshake: every rank's configuration fingerprint, in the same fixed-size all-gather (every forward,
        # so also after load_state_dict or a reassigned margin); a mismatch raises the same error everywhere
        problem = self._local_problem(local_embeddings, local_labels) or compute_dtype_problem(
            compute_dtype, weight.dtype
        )
        rows = local_embeddings.shape[0] if problem is None else 0
        backend = ops.resolve_backend(self.backend, device)
        if world == 1:
            # one rank: nothing to agree on, and no host round trip (the fingerprint's crc32 and .tolist() would stop
            # torch.compile(fullgraph=True) from tracing the single-process head)
            if problem is not None:
                raise ValueError(problem)
            check_backend_fits(self.backend, weight)
            sizes, bad_labels = [rows], not torch.compiler.is_compiling()  # checked below, one host read
        else:
            problem = problem or self._backend_problem(backend)
            # this rank's labels out of range, counted on the device and read in the handshake's one host read
            count = (
                None if problem is not None else _labels_out_of_range(local_labels, self.num_classes, self.ignore_index)
            )
            sizes, bad_labels = self._handshake(rows, problem, count, group, world, device, compute_dtype, backend)
        if sum(sizes) == 0:
            raise ValueError("DistributedMarginLoss: the global batch is empty (0 rows on every rank)")
        compute_dtype = compute_dtype_on(backend, compute_dtype, weight)

        # 2. the global batch
        x_all = _GatherEmbeddings.apply(
            local_embeddings.to(weight.dtype), sizes, rank, group, self.embedding_grad_scale
        )
        labels = _gather_rows(local_labels.long(), sizes, group)
        if bad_labels:  # the gathered labels: the same error on every rank
            check_label_values(labels, self.num_classes, self.ignore_index)
        valid = labels != self.ignore_index
        owned = valid & (labels >= self.class_start) & (labels < self.class_start + self.num_local)
        local_labels_all = torch.where(owned, labels - self.class_start, torch.zeros_like(labels))

        # 3. pre-pass.  The owner of a row's label computes its target cosine; one all-reduce gives every
        # rank all of them (no gradient: threshold, t and cross-row margins such as ElasticFace+ read them).
        # Ignored rows take class 0's cosine, as the single-process pre-pass does, so that margins that rank
        # rows see the same values.
        margin = self.margin
        acc = accumulation_dtype(weight.dtype)
        x = x_all.to(acc)
        x_norm = torch.linalg.vector_norm(x, dim=1)
        x_hat = x / x_norm.clamp_min(NORM_EPS)[:, None]
        cos_rows = owned | (~valid & (self.class_start == 0) & (self.num_local > 0))
        # the op's dense (rows, D) weight gradient must reach W after the target rows' sparse one, to be added to
        # it in place: the other order allocates a second (rows, D) tensor (memory_plan counts one)
        weight_for_op = _DenseGradLast.apply(weight)
        cos_local = self._target_cosines(x_hat, local_labels_all, cos_rows, margin.subcenters)
        cos_target = _ReplicatedSum.apply(cos_local.detach(), group)

        # CurricularFace: t ← α·mean(c_iy) + (1 − α)·t from the all-reduced cosines, identical on every rank
        if isinstance(margin, CurricularFace) and self.training:
            self._step_margin()  # creates t if the margin was switched after construction
            with torch.no_grad():
                # masked, without a data-dependent branch (torch.compile): no counted row leaves t as it is
                count = valid.sum()
                mean_cos = torch.where(valid, cos_target, torch.zeros_like(cos_target)).sum() / count.clamp_min(1)
                updated = self.t * (1.0 - self.curricular_alpha) + self.curricular_alpha * mean_cos.to(self.t.dtype)
                self.t.copy_(torch.where(count > 0, updated, self.t))
        margin = self._step_margin()

        # The owner's target logit (and per-row extra loss term), from its own cosines (with gradient) and
        # everyone else's (detached); a second all-reduce shares them.  The loss is then replicated, and
        # each rank-local quantity (cosine, norm, op) gets exactly its own share of the gradient.
        row_scale = margin.row_scale(x_norm)
        cos_mixed = torch.where(cos_rows, cos_local, cos_target)
        zero = torch.zeros((), dtype=acc, device=device)
        z_local = torch.where(owned, margin.target_logit(cos_mixed, row_scale, x_norm), zero)
        extra = margin.extra_loss(x_norm)
        shared = [z_local] if extra is None else [z_local, torch.where(owned, extra, zero)]
        shared = _ReplicatedSum.apply(torch.stack(shared), group)
        target_logit = shared[0]
        threshold = margin.threshold(cos_target).detach()

        # 4. Partial FC sampling and the local fused op
        class_index = None
        op_labels = torch.where(owned, local_labels_all, torch.full_like(labels, -1))
        have_rows = self.num_local > 0
        if self.training and self.sample_rate < 1.0 and have_rows:
            with torch.no_grad():
                class_index = self._sample(local_labels_all, owned)
                op_labels = torch.where(
                    owned, torch.searchsorted(class_index, local_labels_all), torch.full_like(labels, -1)
                )
            self.sample_step += 1
        self.weight_index = class_index
        filtering = self.interclass_filtering_threshold
        filter_threshold = filtering if filtering > 0 else FILTER_OFF
        argmax_local = None
        if have_rows and (class_index is None or class_index.numel() > 0):
            lse_local, argmax_local = ops.fused_lse(
                backend,
                x_hat.to(compute_dtype),
                weight_for_op,
                op_labels,
                z_local,
                row_scale,
                threshold,
                class_index,
                margin.non_target_param,
                margin.non_target_mode,
                filter_threshold,
                margin.subcenters,
                self.deterministic,
            )
        else:  # no column on this rank: log 0.  The zero-weighted sums keep X and the weight in the graph:
            # every rank must run the embedding gather's backward (a collective), and the weight gets a zero
            # gradient rather than None
            lse_local = torch.full_like(z_local, float("-inf")) + 0.0 * (x_hat.sum(1) + weight.sum().to(acc))

        # 5. global log-sum-exp and the loss
        lse = torch.logsumexp(_ReplicatedStack.apply(lse_local, rank, world, group), dim=0)
        loss = row_losses(lse, target_logit, None if extra is None else shared[1], valid)
        reduced = reduce_loss(loss, valid, self.reduction).to(weight.dtype)
        if not return_stats:
            return reduced
        with torch.no_grad():
            predicted = self._global_prediction(x_hat, argmax_local, class_index)
            stats = make_stats(lse.detach(), torch.where(valid, cos_target, zero), predicted, labels, valid)
        return reduced, stats

    def _global_prediction(self, x_hat, argmax_local, class_index):
        """Global class of each row's highest raw cosine: every rank scores its own best column (the op's
        arg-max), one all-gather, then the best over ranks (ties to the lower class, as the op does)."""
        B, k = x_hat.shape[0], self.margin.subcenters
        best = torch.full((B,), float("-inf"), dtype=x_hat.dtype, device=x_hat.device)
        cls = torch.zeros((B,), dtype=torch.long, device=x_hat.device)
        if argmax_local is not None:
            local = argmax_local if class_index is None else class_index[argmax_local]
            cos = subcenter_cosines(x_hat, self.weight.detach(), local, k)
            best, cls = cos.max(dim=1).values, local + self.class_start
        sizes = [B] * self.world_size
        best_all = _gather_rows(best, sizes, self.process_group).reshape(self.world_size, B)
        cls_all = _gather_rows(cls, sizes, self.process_group).reshape(self.world_size, B)
        winner = best_all.argmax(dim=0)  # first maximum: the lower rank, so the lower class; NaN wins
        return cls_all.gather(0, winner[None, :]).squeeze(0)

    def _target_cosines(self, x_hat, local_labels, rows_mask, subcenters):
        """c_iy for the rows in rows_mask (labels local to the shard, max over sub-centers), 0 elsewhere."""
        # every row (class 0 for the others), then masked: no data-dependent size, so torch.compile traces it
        if self.num_local == 0:
            return torch.zeros(x_hat.shape[0], dtype=x_hat.dtype, device=x_hat.device)
        cls = torch.where(rows_mask, local_labels, torch.zeros_like(local_labels))
        # sparse weight gradient: see _DenseGradLast in _forward
        cos = subcenter_cosines(x_hat, self.weight, cls, subcenters, sparse_grad=True)
        cos = cos.max(dim=1).values.clamp(-1.0, 1.0)
        return torch.where(rows_mask, cos, torch.zeros_like(cos))
