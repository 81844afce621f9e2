"""Several processes (GPUs, servers) for one run, on PyTorch's own distributed stack.

Launched by `torchrun` (`torchrun --nproc_per_node N -m privdpo dpo CONFIG`), which sets
RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; without it a run is one process and
nothing here does anything. The run is the same run on any number of processes:

- every rank builds the same logical batch from the run's seed (the data order and the
  Poisson sample of DP units do not depend on the world size) and takes its share of it:
  a contiguous slice of the items, or, under DP, every W-th sampled unit (all of a unit's
  rows on one rank, so per-unit clipping stays local);
- gradients are summed over ranks by privdpo's own reduction (`all_reduce_sum`, called
  by the recipes after the backward passes), not by `DistributedDataParallel`: the model is
  never wrapped in DDP. Under DP the reduction must come after each rank has clipped its
  units' gradients and summed them, and before the noise is added, which DDP's reduction
  during the backward pass would not allow. The losses are already divided by the global
  counts, so the sum is the one-process gradient;
- under DP the ranks' clipped sums are summed, then the same Gaussian noise (one seed for
  the world, from rank 0 when it is drawn securely) is added to the same total on every
  rank: noise once per step, not once per rank; `check_same` verifies on logging steps
  that every rank holds the same noised gradient;
- rank 0 alone writes files (logs, metrics, checkpoints, reports, the ledger); the other
  ranks print nothing to stdout. A failure on one rank ends that process with its error,
  named `[rank N]` by `privdpo.cli`, and torchrun stops the others; every process leaves
  the process group on its way out (`close_world`), failed or not.

`train.parallel`: `ddp` (the default) replicates the model on every rank (the name says
what it does, not that DDP's wrapper is used); `fsdp` shards each decoder layer with FSDP2
(`fully_shard`, bf16 mixed precision for a bf16 model, optional CPU offload) and keeps the
rest replicated (non-private runs).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def init_world(device_name: str) -> World:
    """Join the process group torchrun set up (idempotent); a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = device_name != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if not world.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 speaks for the run
    return world


def close_world(wait_for_peers: bool = False) -> None:
    """Leave the process group, if this process joined one. A group left for the
    interpreter's exit to tear down can abort the process (gloo: "terminate called without
    an active exception"); `privdpo.cli.main` calls this on every way out. After a run that
    succeeded, `wait_for_peers` first waits at a barrier, so that no rank tears its group
    down while a peer still talks to it (which aborted a peer the same way under load)."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def lost_a_peer(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another rank's process ended. gloo
    raises it at once (NCCL waits until torchrun stops this rank); the other rank reports
    its own error, the cause."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("closed by peer" in text or "reset by peer" in text)


def collective_device() -> torch.device:
    """Where the process group's collectives take their tensors: this rank's GPU under
    NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def broadcast_int(world: World, value: int) -> int:
    """`value` of rank 0, on every rank."""
    if not world.active:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return int(t.item())


def all_reduce_sum(world: World, tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over ranks, in place, in one flat buffer per dtype and device."""
    if not world.active or not tensors:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def check_same(world: World, tensors: list[torch.Tensor], what: str) -> None:
    """Raise unless every rank holds the same `tensors` (a float64 fingerprint each)."""
    if not world.active:
        return
    local = torch.stack(
        [t.detach().double().pow(2).sum() + t.detach().double().sum() for t in tensors]
    )
    gathered = [torch.zeros_like(local) for _ in range(world.size)]
    dist.all_gather(
        gathered, local.cpu() if local.is_cuda and dist.get_backend() == "gloo" else local
    )
    if any(not torch.equal(g.to(local.device), local) for g in gathered):
        raise RuntimeError(
            f"{what} differ between ranks: each rank must hold the same values (noise is"
            " added once per step, to the sum over ranks)"
        )


def share(world: World, items: list) -> list:
    """This rank's contiguous slice of `items` (every rank's slices cover them in order)."""
    if not world.active:
        return items
    n = len(items)
    return items[world.rank * n // world.size : (world.rank + 1) * n // world.size]


def units_share(world: World, units: list[int]) -> list[int]:
    """This rank's sampled DP units: every world.size-th, starting at its rank."""
    return units[world.rank :: world.size] if world.active else units
