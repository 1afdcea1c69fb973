"""``train --compile``: the training network's forward pass (and so its backward) through torch.compile.

Why: at the shipped models' size a GPU step is a few thousand small kernels, and the GPU spends
more time waiting for the host to launch them than running them. torch.compile fuses the
element-wise work (GroupNorm + SiLU, the residual adds, the embedding) into far fewer kernels,
forward and backward. The price is a compile of about a minute before the first step (on the CPU
longer, with a C++ compiler), and again when the batch shape changes.

Only the network being trained is compiled, by wrapping it: ``Trainer.net`` stays the plain module,
so checkpoints and model files hold the same names as without ``--compile`` (an ``OptimizedModule``
would add ``_orig_mod.`` to every key), and the EMA copy, validation and sampling run uncompiled.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch

from minidiff_cli.errors import MinidiffError, first_line

MODE = "default"  # fusion only; "reduce-overhead" (CUDA graphs) is measured by benchmarks/bench_train_speed.py


def check_can_compile(device: torch.device) -> None:
    """Refuse ``--compile`` in one line where torch cannot compile for ``device``, before anything is made."""
    if not torch._dynamo.is_dynamo_supported():
        raise MinidiffError("--compile: torch.compile does not support this Python or platform; train without it")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise MinidiffError("--compile on CUDA needs Triton (pip install triton); train without --compile")
    if device.type == "cpu" and not any(shutil.which(name) for name in _cpp_compilers()):
        raise MinidiffError("--compile on the CPU needs a C++ compiler (g++ or clang++, or $CXX); "
                            "train without --compile")


def _cpp_compilers() -> list[str]:
    return [name for name in (os.environ.get("CXX"), "g++", "c++", "clang++") if name]


class CompiledForward:
    """``module`` called through torch.compile; a compile failure becomes one MinidiffError line."""

    def __init__(self, module: torch.nn.Module, mode: str = MODE):
        self.module, self.mode = module, mode
        self.compiled = torch.compile(module, mode=mode)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "reduce-overhead" in self.mode:  # CUDA graphs: a new step may reuse the last step's output memory
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as exc:  # inductor's errors derive from it too
            raise MinidiffError(f"--compile failed: {first_line(exc, 200, empty=type(exc).__name__)}; "
                                "train without --compile") from None
