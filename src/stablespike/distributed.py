"""Ranks: one process per device under ``torchrun``, with torch.distributed as the engine.

``setup(device)`` joins the process group that ``torchrun`` describes in the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), with gloo on CPU and nccl on CUDA, and returns
a :class:`Ranks` (rank, world size, device). Without those variables it is a single process and
every helper below is the identity, so the same code runs under ``python`` and under ``torchrun``.

The helpers are collectives: every rank must call them, in the same order.

- :func:`mean_across_ranks` -- differentiable mean of a tensor over ranks (the Lyapunov estimate
  used in the loss), whose gradient is the single-process one once DDP averages the gradients.
- :func:`merge_across_ranks` -- streaming accumulators (``stats.FiringRate`` ...) of all ranks
  combined state by state with all-reduces (each accumulator's ``sync``, following the reduction
  its states declare), so every rank gets the same merged table; nothing is pickled.
- :func:`broadcast_from_main`, :func:`any_rank`, :func:`sum_across_ranks` -- decisions and totals.
- :func:`average_buffers` -- BatchNorm running statistics made equal on every rank.
"""
from __future__ import annotations

import atexit
import gc
import copy
import math
import os
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
RENDEZVOUS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs progress and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This rank's strided share of ``n`` items (``rank::world_size``); together the shares
        cover every item exactly once."""
        return slice(self.rank, n, self.world_size)


def active() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def should_sync(sync: Optional[bool]) -> bool:
    """A report's ``sync`` argument: None means "when there is more than one rank"."""
    return active() if sync is None else bool(sync)


def current(device: str = "cpu") -> Ranks:
    """The ranks of the initialized process group (one process when there is none)."""
    if not active():
        return Ranks(device=device)
    local = int(os.environ.get("LOCAL_RANK", 0))
    return Ranks(dist.get_rank(), dist.get_world_size(), local, _rank_device(device, local))


def setup(device: str = "cpu") -> Ranks:
    """Join torchrun's process group if the environment describes one of more than one rank.

    ``device`` is ``"cpu"`` or ``"cuda"`` (each rank then takes ``cuda:LOCAL_RANK``, whatever
    index was given); the backend
    follows it: gloo for CPU, nccl for CUDA. Raises a ValueError naming a missing rendezvous
    variable when the environment is half set (e.g. WORLD_SIZE without MASTER_ADDR).
    """
    if dist.is_available() and dist.is_initialized():
        return current(device)
    if not any(name in os.environ for name in ("RANK", "WORLD_SIZE")):
        return Ranks(device=device)
    env = _rendezvous_env()
    if env["WORLD_SIZE"] == 1:
        return Ranks(device=device)
    local = int(os.environ.get("LOCAL_RANK", env["RANK"]))
    rank_device = _rank_device(device, local)
    backend = "nccl" if rank_device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank_device)
    dist.init_process_group(backend, init_method="env://")
    atexit.register(_shutdown)
    return current(device)


def _rendezvous_env() -> Dict[str, int]:
    missing = [name for name in RENDEZVOUS if not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"{missing[0]}: the rendezvous variable is not set (a distributed run needs "
            f"{', '.join(RENDEZVOUS)}; launch with torchrun, which sets them all)")
    out = {}
    for name in ("RANK", "WORLD_SIZE"):
        text = os.environ[name]
        if not text.isdigit():
            raise ValueError(f"{name}: expected a non-negative integer, got {text!r}")
        out[name] = int(text)
    if out["WORLD_SIZE"] < 1 or out["RANK"] >= out["WORLD_SIZE"]:
        raise ValueError(f"RANK: expected 0 <= RANK < WORLD_SIZE={out['WORLD_SIZE']}, got {out['RANK']}")
    return out


def _rank_device(device: str, local_rank: int) -> str:
    """With several ranks, ``cuda`` (or any ``cuda:N``) means this rank's GPU, ``cuda:LOCAL_RANK``."""
    return f"cuda:{local_rank}" if str(device).startswith("cuda") else str(device)


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        # a finished DDP wrapper left in a reference cycle still holds the process group; freed
        # only at interpreter teardown, its gloo threads aborted the process ("terminate called
        # without an active exception") in about 1 of 3 two-rank test runs, 0 of 16 with this
        gc.collect()
        dist.destroy_process_group()


def check_batch_size(batch_size: int, ranks: Ranks) -> int:
    """The per-rank batch of a global ``batch_size``; the world size must divide it."""
    if batch_size % ranks.world_size:
        raise ValueError(f"batch_size: expected a multiple of the world size "
                         f"(WORLD_SIZE={ranks.world_size}), got {batch_size}")
    return batch_size // ranks.world_size


def data_parallel(model: nn.Module, ranks: Ranks) -> nn.Module:
    """``model`` in DistributedDataParallel when there is more than one rank, else ``model``.

    The neurons' per-step state buffers (snnTorch keeps the last ``mem`` / ``syn`` / ``spk`` as
    non-persistent buffers, shaped like the last batch) are left out of DDP's buffer broadcast:
    they are not model state, and ranks whose last batches differ in size would otherwise send
    buffers of different sizes. Persistent buffers (BatchNorm statistics) stay synchronized.
    """
    if not ranks.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    persistent = _persistent_buffers(model)
    per_step = [name for name, _ in model.named_buffers() if name not in persistent]
    DDP._set_params_and_buffers_to_ignore_for_model(model, per_step)
    device_ids = [ranks.local_rank] if ranks.device.startswith("cuda") else None
    return DDP(model, device_ids=device_ids)


def _persistent_buffers(model: nn.Module) -> set:
    """Names of the buffers that are model state (saved in the state dict, e.g. BatchNorm
    statistics), as opposed to per-step state such as snnTorch's ``mem``."""
    return set(model.state_dict())


@torch.no_grad()
def average_buffers(model: nn.Module) -> None:
    """Average the model's persistent floating-point buffers over ranks (in place).

    DDP hands rank 0's buffers to every rank at the start of each forward, so after the last
    training step each rank holds BatchNorm running statistics updated from its own samples only;
    averaging them at the end of an epoch gives every rank the same model (statistics from all
    samples) before it is evaluated and saved.
    """
    if not active():
        return
    persistent = _persistent_buffers(model)
    buffers = [b for name, b in model.named_buffers() if name in persistent and b.is_floating_point()]
    for b in buffers:
        dist.all_reduce(b)
        b.div_(dist.get_world_size())


class _MeanAcrossRanks(torch.autograd.Function):
    """mean_r x_r. Backward: the gradient of the mean w.r.t. this rank's x is the mean of the
    ranks' output gradients (each rank's loss holds the same mean, so summing their gradients
    and dividing by the world size gives dL/dx_r = L'(mean); DDP's averaging then yields the
    single-process gradient of L(mean over all samples))."""

    @staticmethod
    def forward(ctx, x):
        out = x.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out / dist.get_world_size()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad / dist.get_world_size()


def mean_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Differentiable mean of ``x`` (any shape, the same on every rank) over all ranks."""
    return _MeanAcrossRanks.apply(x) if active() else x


def sum_across_ranks(values: List[float]) -> List[float]:
    """Element-wise sum over ranks of a few numbers (epoch totals), in float64."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (e.g. a non-finite loss), so that all ranks
    take the same branch and no collective is left waiting."""
    if not active():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` (picklable) on every rank: one decision (a path, a checkpoint, whether a
    run is done) instead of one per rank, which on nodes without a shared disk could differ."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def merge_across_ranks(accumulators: Dict[str, T]) -> Dict[str, T]:
    """``{name: accumulator}`` of every rank combined, the same on every rank (new objects; this
    rank's own are left as they are); the input itself is returned in one process.

    Each accumulator is a copy ``sync``-ed with :func:`reduce_across_ranks`: its declared states
    are all-reduced (sums, maxima, minima) or all-gathered (windows of recent values), so no
    object is pickled. Every rank must hold the same names (ValueError otherwise); a layer a rank
    saw no data for contributes nothing.
    """
    if not active():
        return accumulators
    names = sorted(accumulators)
    digest = torch.tensor([len(names), zlib.crc32("\n".join(names).encode())], dtype=torch.int64)
    low, high = reduce_across_ranks(digest, "min"), reduce_across_ranks(digest, "max")
    if not torch.equal(low, high):
        raise ValueError("accumulators: every rank must hold the same layer names to merge them "
                         f"(this rank has {names})")
    merged = {name: copy.deepcopy(accumulators[name]).sync(reduce_across_ranks) for name in names}
    return {name: merged[name] for name in accumulators}  # this rank's (recording) order


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def reduce_across_ranks(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` reduced over ranks: ``sum``, ``max`` or ``min`` element-wise (all-reduce), or
    ``cat``: the 1-D tensors of all ranks concatenated in rank order (all-gather). A collective."""
    dev = _collective_device()
    x = t.detach().to(dev).clone()
    if kind == "cat":
        longest = torch.tensor([x.numel()], dtype=torch.int64, device=dev)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        pad = torch.full((int(longest),), math.nan, dtype=torch.float64, device=dev)
        pad[: x.numel()] = x.reshape(-1)
        parts = [torch.empty_like(pad) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, pad)
        return torch.cat([p[~torch.isnan(p)] for p in parts]).to(t.device)
    if kind not in _OPS:
        raise ValueError(f"kind: expected one of sum, max, min, cat, got {kind!r}")
    dist.all_reduce(x, op=getattr(dist.ReduceOp, _OPS[kind]))
    return x.to(t.device)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
