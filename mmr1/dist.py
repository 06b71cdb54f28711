"""Where this process stands and how ranks talk: the process group (torchrun means RANK is set),
reductions over ranks, this rank's share of a global batch, and named seed streams."""

from __future__ import annotations

import datetime
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def derive_seed(seed: int, stream: str, *counters: int) -> int:
    """A 31-bit seed for one random stream, distinct for every (seed, stream, counters): stream names the
    consumer ("rollout", "val", "vas", ...), counters are the step, the rank, a call number. The inputs go
    through numpy's SeedSequence hash, so streams never coincide by arithmetic (as `seed * K + step` can)."""
    words = [seed & 0xFFFFFFFF, *stream.encode(), *(c & 0xFFFFFFFF for c in counters)]
    return int(np.random.SeedSequence(words).generate_state(1)[0] >> 1)


# Collective timeout of the process group: NCCL's 10 minutes can be shorter than a save at 7B (docs/checkpoints.md)
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass
class Dist:
    """Where this process stands: its rank, the world size, its local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def master(self) -> bool:
        """Rank 0: the process that prints, logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process (torchrun): collectives and FSDP2 are in play."""
        return self.world_size > 1


def setup_distributed(seed: int = 0) -> Dist:
    """Initialises torch.distributed (timeout TIMEOUT) when launched by torchrun: nccl on GPU, gloo on CPU;
    without RANK in the environment a single process on cuda:0 or the CPU. Seeds python, numpy and
    torch with `seed` on every rank (per-rank streams are derived where needed)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return Dist(rank, world, local_rank, device)


def require_cuda(d: Dist, what: str) -> None:
    """Stops with one line when `what` (a paper-scale run) would start on the CPU: torch sees no GPU,
    most often because the driver is older than the CUDA this torch was built for."""
    if d.device.type != "cuda":
        raise SystemExit(
            f"error: {what} needs CUDA GPUs, and torch {torch.__version__} (CUDA {torch.version.cuda}) sees none: "
            "torch.cuda.is_available() is False (no GPU, or an NVIDIA driver older than this torch's CUDA "
            "needs; see docs/gpu.md); a 7B run on CPU with gloo would never finish"
        )


def cleanup_distributed() -> None:
    """Tears down the process group if one was created."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum of a scalar or tensor over all ranks (identity on one process); returns a new tensor."""
    t = torch.as_tensor(value, dtype=value.dtype if torch.is_tensor(value) else torch.float64, device=device).clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_dict(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """{name: sum over ranks of values[name]}, one collective for the whole dict (same keys, same
    order on every rank); identity on one process."""
    names = list(values)
    summed = all_reduce_sum(torch.tensor([float(values[k]) for k in names], dtype=torch.float64), device)
    return dict(zip(names, summed.tolist()))


def shard(items: list, d: Dist) -> tuple[list, int]:
    """(this rank's contiguous share of `items`, the number of real items in it): padded to the same length
    on every rank by repeating items from the start (equal work for FSDP2 forwards and synced generation);
    drop the padding before counting results."""
    per_rank = math.ceil(len(items) / d.world_size)
    mine = items[d.rank * per_rank : (d.rank + 1) * per_rank]
    padding = [items[i % len(items)] for i in range(per_rank - len(mine))] if items else []
    return list(mine) + padding, len(mine)


def interleave(items: list, world_size: int) -> list:
    """`items` reordered so that shard() hands them out round-robin: rank r's share holds items r, r + W,
    r + 2W, ... (when W divides the length; else ranks whose share is full drop out of the deal). Every
    rank then gets a slice of every part of the data (rows grouped by source cost all ranks alike)."""
    per_rank = math.ceil(len(items) / world_size) if items else 0
    sizes = [max(0, min(per_rank, len(items) - r * per_rank)) for r in range(world_size)]  # shard()'s share sizes
    shares: list[list] = [[] for _ in range(world_size)]
    dealt = iter(items)
    for k in range(per_rank):
        for r in range(world_size):
            if k < sizes[r]:
                shares[r].append(next(dealt))
    return [x for share in shares for x in share]


def rounds(items: list, per_rank: int, world_size: int) -> list[list]:
    """`items` cut into rounds of per_rank x world_size, each interleaved: one call of per_rank items on
    every rank, then the caller's all-gather, so no rank waits past TIMEOUT at a single gather at the end."""
    size = per_rank * world_size
    return [interleave(items[s : s + size], world_size) for s in range(0, len(items), size)]


def all_gather_list(items: list, d: Dist) -> list:
    """Concatenation over ranks (rank order) of each rank's Python list."""
    if not d.enabled:
        return list(items)
    gathered: list[list] = [None] * d.world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def all_reduce_max(value: int, device: torch.device) -> int:
    """Largest value of an integer over all ranks (the value itself on one process)."""
    t = torch.tensor(value, dtype=torch.long, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
