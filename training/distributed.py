"""torchrun/DDP plumbing: one process per device, set up from the environment torchrun provides."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(timeout: timedelta = timedelta(minutes=60)) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process.

    `timeout` bounds every collective: the ranks that wait while rank 0 alone trains the tokenizer or
    evaluates must not hit NCCL's 10-minute default on a large pool."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return Dist(rank, world_size, local_rank, device)


def all_true(d: Dist, flag: torch.Tensor) -> torch.Tensor:
    """A bool tensor that is true on every rank only if it is true on all (so all ranks skip a bad step together).

    Stays on the device: the all-reduce is queued on the stream like any kernel, and nothing waits for it.
    """
    if not d.enabled:
        return flag
    value = flag.to(torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value.bool()


def mean(d: Dist, value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over ranks, as a new tensor (the input is left as it was)."""
    if not d.enabled:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / d.world_size


def gather_objects(d: Dist, obj: object) -> list:
    if not d.enabled:
        return [obj]
    out: list = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(d: Dist, obj: object) -> object:
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(d: Dist, work: Callable[[], T]) -> T | None:
    """Run `work` on rank 0 only (what writes files), and raise on every rank if it raises there.

    Why: the other ranks wait for rank 0 at the next collective. On one node torchrun's agent stops them
    when rank 0's process dies (measured: 7 s), but with the reason only in rank 0's log; a launcher with
    no such agent would leave them there until the process group's timeout (`--dist_timeout_minutes`).
    Here each rank stops at once and says why.
    """
    result, error = None, None
    if d.main:
        try:
            result = work()
        except Exception as exc:  # every rank learns of it below; rank 0 re-raises the original
            error = exc
    message = broadcast_object(d, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed, so rank {d.rank} stops too: {message}")
    return result


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
