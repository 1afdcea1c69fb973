"""Several processes under torchrun: the process group, each rank's device, and agreeing across ranks.

A run started by ``torchrun --nproc-per-node N minidiff train ...`` (or ``vae train``, or
``generate``) joins the group torchrun set up; a plain run is rank 0 of a world of 1 and
none of this costs anything.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch

from minidiff_cli.errors import MinidiffError
from minidiff_cli.runtime.devices import pick_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(leave_group)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def leave_group() -> None:
    """Leave the process group, if one is joined, while the interpreter is still whole.

    A process that exits inside the group leaves it to interpreter shutdown, where gloo's worker
    threads can still hold tensors whose release takes the GIL while Python is finalising, and the
    process aborts (SIGABRT, exit -6 under torchrun; pytorch/pytorch#190489). ``init_distributed``
    registers this with atexit, which runs before finalisation; calling it twice is harmless.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def start_training(cfg) -> tuple[torch.device, Dist, Any]:
    """(device, Dist, AutoThreads) of a training run (`train`, `vae train`): the thread count set,
    torchrun's process group joined, each rank on its own GPU; a batch too small to share refused."""
    from minidiff_cli.runtime.threads import AutoThreads, apply_threads

    device = pick_device(cfg.device)
    apply_threads(cfg.threads or None)
    auto_threads = AutoThreads(cfg.threads or None)  # follows other work during a long run
    dist = init_distributed(device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if cfg.batch_size < dist.world:
        raise MinidiffError(f"--batch-size {cfg.batch_size} is smaller than the {dist.world} processes; "
                            "each needs at least one image per step")
    return device, dist, auto_threads


def wrap_ddp(module: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel under torchrun; itself in a single process."""
    if dist.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def any_rank(flag: bool, dist_info: Dist, device: torch.device) -> bool:
    """True on every rank if it is True on one: ranks must stop at the same step, or the
    others would wait forever in the next gradient all-reduce."""
    if dist_info.world == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def weights_fingerprint(*modules: torch.nn.Module) -> int:
    """A 63-bit hash of the exact bytes of every tensor in ``modules``' state dicts."""
    import hashlib

    digest = hashlib.sha256()
    for module in modules:
        for key, value in module.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def check_replicas(dist_info: Dist, device: torch.device, modules, log) -> None:
    """DDP keeps every rank's weights identical; check it, so that a silent divergence cannot
    pass unnoticed (each rank hashes the weights of ``modules`` and the hashes are compared)."""
    if dist_info.world == 1:
        return
    import torch.distributed as dist

    mine = torch.tensor([weights_fingerprint(*modules)], device=device)
    every = [torch.zeros_like(mine) for _ in range(dist_info.world)]
    dist.all_gather(every, mine)
    differ = [rank for rank, value in enumerate(every) if value.item() != every[0].item()]
    if differ:
        raise MinidiffError(f"rank(s) {', '.join(map(str, differ))} ended with weights that differ from "
                            "rank 0's; the processes went out of sync")
    if dist_info.main:
        log(f"checked: all {dist_info.world} processes hold identical weights")
