"""Which device and dtype a run uses (``auto`` picks CUDA, then MPS, then the CPU; names are checked), and
copies onto it that do not stall a GPU (``to_device``)."""

from __future__ import annotations

import torch

from minidiff_cli.errors import MinidiffError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | torch.device = "auto") -> torch.device:
    device = str(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise MinidiffError(f"unknown device '{device}'; use auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MinidiffError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise MinidiffError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA GPU(s), "
                            "numbered from 0")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MinidiffError("--device mps was asked for but MPS is not available; use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # float32 everywhere: small models gain little from half precision, and the first
        # steps of a cosine schedule amplify the model's rounding errors a hundredfold.
        return torch.float32
    if dtype not in DTYPES:
        raise MinidiffError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16")
    if dtype == "float16" and device.type == "cpu":
        raise MinidiffError("float16 is not supported on the CPU; use float32 or bfloat16")
    return DTYPES[dtype]


# False makes every to_device copy a plain blocking one, as before it existed (the baseline of
# benchmarks/bench_train_speed.py); nothing else should change it.
NON_BLOCKING = True


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (made on the CPU) on ``device``, without making the host wait for a GPU.

    A plain ``.to("cuda")`` from ordinary (pageable) memory waits until the GPU has finished
    everything queued before it: in a training step of a small model, where the host queues
    kernels faster than the GPU runs them, each such copy stalls the queue. From pinned memory
    the copy is queued like a kernel (``non_blocking``), and torch's pinned-memory cache keeps
    the source alive until the copy is done. The values are the same either way; on the CPU
    (and MPS) this is ``tensor.to(device)``.
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu" or not NON_BLOCKING:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
