"""From a model file to pictures: load, encode the prompt, sample with guidance, decode.

    from minidiff_cli import Pipeline
    pipe = Pipeline.load()                     # the shipped model, on the best device
    images = pipe.generate("a red circle", steps=50, cfg=3.0, seed=0, num_images=4)
    images[0].save("circle.png")

Initial noise is drawn on the CPU with one generator per image seeded
``seed + k``, so image k of a batch is the image a single run with seed + k
gives, on any device and at any batch size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from minidiff_cli import plugins
from minidiff_cli.errors import MinidiffError
from minidiff_cli.guidance import guided_denoiser
from minidiff_cli.model import DiffusionModel
from minidiff_cli.models_dir import resolve_model
from minidiff_cli.sampling import noise_like

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise MinidiffError(f"unknown device '{device}'; use auto, cpu, cuda or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MinidiffError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
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


@dataclass
class Generation:
    """What one ``generate`` call was asked for, fully resolved (it goes into the PNG)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    cfg: float = 3.0
    sampler: str = "ddim"
    seed: int = 0
    eta: float | None = None
    sampler_options: dict[str, Any] = field(default_factory=dict)

    def params(self, model_name: str, model_hash: str, size: int, index: int) -> dict[str, Any]:
        """The parameters of image ``index`` (its own seed) as stored in its PNG."""
        out = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "steps": self.steps,
               "sampler": self.sampler, "cfg": self.cfg, "seed": self.seed + index, "eta": self.eta,
               "width": size, "height": size, "model": model_name, "model_hash": model_hash}
        if self.sampler_options:
            out["sampler_options"] = self.sampler_options
        return out


class Pipeline:
    """A loaded model, ready to generate images."""

    def __init__(self, model: DiffusionModel, name: str = "model", dtype: torch.dtype = torch.float32):
        self.model = model
        self.name = name
        self.dtype = dtype

    @classmethod
    def load(cls, model: str | os.PathLike | None = None, device: str = "auto", dtype: str = "auto") -> "Pipeline":
        path = resolve_model(model)
        dev = pick_device(device)
        torch_dtype = pick_dtype(dtype, dev)
        loaded = DiffusionModel.load(path, device=dev)
        loaded.unet.to(dtype=torch_dtype)
        return cls(loaded, name=loaded.config.get("name") or path.stem, dtype=torch_dtype)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generate(self, prompt: str, steps: int = 50, cfg: float = 3.0, sampler: str = "ddim", seed: int = 0,
                 num_images: int = 1, *, negative: str = "", eta: float | None = None,
                 batch_size: int | None = None, callback: Callable[[dict], None] | None = None,
                 **sampler_options: Any) -> list:
        """Images for ``prompt`` as PIL images; each carries its parameters in ``.info``."""
        gen = Generation(prompt, negative or "", steps, float(cfg), sampler, seed, eta, sampler_options)
        x = self.sample(gen, num_images, batch_size=batch_size, callback=callback)
        return [self._to_image(img, gen.params(self.name, self.model.hash, self.model.image_size, k))
                for k, img in enumerate(x)]

    def sample(self, gen: Generation, num_images: int = 1, *, batch_size: int | None = None,
               callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """Samples of ``gen.prompt`` in [-1, 1], a [N, C, H, W] float32 CPU tensor; image k uses seed + k."""
        self._check(gen, num_images)
        seeds = [gen.seed + k for k in range(num_images)]
        return self.sample_many(gen, [gen.prompt] * num_images, seeds, batch_size=batch_size, callback=callback)

    def sample_many(self, gen: Generation, prompts: list[str], seeds: list[int], *, batch_size: int | None = None,
                    callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """One image per (prompt, seed) pair, batched; ``gen`` gives everything else."""
        sampler = plugins.get_sampler(gen.sampler)
        self._check(gen, len(prompts))
        opts = dict(gen.sampler_options)
        if gen.eta is not None:
            opts["eta"] = gen.eta
        batch_size = batch_size or min(len(prompts), 16)
        out = []
        for start in range(0, len(prompts), batch_size):
            rows = slice(start, start + batch_size)
            out.append(self._sample_batch(gen, sampler, prompts[rows], seeds[rows], opts, callback, start, len(prompts)))
        return torch.cat(out)

    def _check(self, gen: Generation, num_images: int) -> None:
        T = self.model.schedule.num_timesteps
        if not 1 <= gen.steps <= T:
            raise MinidiffError(f"steps must be between 1 and {T} for this model (got {gen.steps})")
        if gen.cfg < 0:
            raise MinidiffError(f"cfg must be 0 or more (got {gen.cfg})")
        if num_images < 1:
            raise MinidiffError(f"the number of images must be at least 1 (got {num_images})")

    def _sample_batch(self, gen, sampler, prompts, seeds, opts, callback, start, total) -> torch.Tensor:
        model, n = self.model, len(seeds)
        shape = (n, model.channels, model.image_size, model.image_size)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        x = noise_like(torch.empty(shape, device=self.device, dtype=self.dtype), generators)
        cond, uncond = self._conditionings(prompts, gen.negative_prompt)
        denoiser = guided_denoiser(model, cond, uncond, gen.cfg)

        def report(info: dict) -> None:
            if callback is not None:
                callback({**info, "batch_start": start, "batch_size": n, "num_images": total})

        with torch.inference_mode():
            x0 = sampler.sample(denoiser, x, model.schedule, gen.steps, generator=generators,
                                callback=report, **opts)
        return x0.float().clamp(-1, 1).cpu()

    def check_prompt(self, prompt: str, negative: str = "") -> None:
        """Raise the conditioner's one-line error for a prompt it cannot take, before any sampling."""
        self._conditionings([prompt], negative)

    def _conditionings(self, prompts: list[str], negative: str):
        conditioner, n = self.model.conditioner, len(prompts)
        with torch.inference_mode():
            cond = conditioner.encode(list(prompts))
            if cond.context is None and cond.pooled is None:
                return cond, None  # an unconditional model: no guidance to do
            uncond = conditioner.encode([negative] * n) if negative else conditioner.null(n)
        return cond.to(self.device, self.dtype), uncond.to(self.device, self.dtype)

    @staticmethod
    def _to_image(x: torch.Tensor, params: dict[str, Any]):
        from PIL import Image

        array = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        image.info["minidiff"] = params
        return image
