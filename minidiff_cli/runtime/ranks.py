"""Sharing one generate job between the processes torchrun starts.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; ``joined`` joins its process group the way
training does (``runtime.distributed.init_distributed``: NCCL on GPUs, gloo on CPU), gives each
process the GPU of its LOCAL_RANK, and leaves the group on the way out. Outside torchrun it
is a no-op with rank 0 of 1. ``gather`` brings every process's results to rank 0, which
alone prints.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

from minidiff_cli.errors import MinidiffError


def world_size() -> int:
    """How many processes torchrun started (1 outside torchrun); read without importing torch."""
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise MinidiffError(f"WORLD_SIZE must be a whole number of processes (got {value[:20]!r})")
    return int(value)


@contextmanager
def joined(device: str) -> Iterator[tuple[Any, str]]:
    """(Dist, the device this process should use) for the time of the block."""
    if world_size() == 1:
        from minidiff_cli.runtime.distributed import Dist

        yield Dist(), device
        return
    import torch
    import torch.distributed as dist

    from minidiff_cli.runtime.distributed import init_distributed, leave_group

    device = _device_for_rank(device, int(os.environ.get("LOCAL_RANK", "0")))
    joined_here = not dist.is_initialized()
    ranks = init_distributed(torch.device("cuda" if device.startswith("cuda") else "cpu"))
    try:
        yield ranks, device
        dist.barrier()  # on the way out together: no rank closes its sockets while another still sends
    finally:
        if joined_here:
            leave_group()


def _device_for_rank(device: str, local_rank: int) -> str:
    """auto/cuda -> this process's own GPU: NCCL wants one GPU per process."""
    import torch

    if device.startswith("cuda:"):
        raise MinidiffError(f"--device {device}: under torchrun each process uses the GPU of its LOCAL_RANK; "
                            "pass --device cuda or auto")
    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device  # cpu or mps (gloo), or a "cuda" that the pipeline will refuse in one line
    if local_rank >= torch.cuda.device_count():
        raise MinidiffError(f"LOCAL_RANK {local_rank}: there are only {torch.cuda.device_count()} CUDA GPU(s) here; "
                            "start at most that many processes per machine")
    torch.cuda.set_device(local_rank)  # gather_object over NCCL uses the current device
    return f"cuda:{local_rank}"


def gather(obj: Any, ranks) -> list[Any] | None:
    """Every process's ``obj`` in rank order on rank 0; None elsewhere."""
    if ranks.world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * ranks.world if ranks.main else None
    dist.gather_object(obj, out, dst=0)
    return out
