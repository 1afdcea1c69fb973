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

import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from minidiff_cli import plugins
from minidiff_cli.diffusion.guidance import guided_denoiser
from minidiff_cli.diffusion.model import DiffusionModel
from minidiff_cli.diffusion.sampling import noise_like
from minidiff_cli.errors import MinidiffError, PluginError, first_line, is_int
from minidiff_cli.files.models_dir import resolve_model
from minidiff_cli.runtime.devices import pick_device, pick_dtype

MAX_CFG = 1000.0  # far beyond any useful guidance; larger scales overflow float32 into NaN
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
MAX_PROMPT_CHARS = 10_000
MAX_IMAGES = 10_000
# Arguments the pipeline passes to every sampler itself; an option cannot take their place.
RESERVED_OPTIONS = ("denoiser", "x", "schedule", "steps", "generator", "callback", "start", "stop")


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
    init: Any = None  # an img2img.settings.ImageStart: start from a picture, not pure noise

    def steps_taken(self) -> int:
        """Sampler steps per batch: fewer from an init image, more with resampling jumps."""
        return self.steps if self.init is None else self.init.steps_taken(self.steps)

    def params(self, model_name: str, model_hash: str, size: int, index: int) -> dict[str, Any]:
        """The parameters of image ``index`` (its own seed) as stored in its PNG."""
        out = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "steps": self.steps,
               "sampler": self.sampler, "cfg": self.cfg, "seed": self.seed + index, "eta": self.eta,
               "width": size, "height": size, "model": model_name, "model_hash": model_hash}
        if self.sampler_options:
            out["sampler_options"] = self.sampler_options
        if self.init is not None:
            out.update(self.init.params())
        return out


class Pipeline:
    """A loaded model, ready to generate images."""

    def __init__(self, model: DiffusionModel, name: str = "model", dtype: torch.dtype = torch.float32):
        self.model = model
        self.name = name
        self.dtype = dtype
        self.source: Path | None = None

    @classmethod
    def load(cls, model: str | os.PathLike | None = None, device: str = "auto", dtype: str = "auto",
             threads: int | None = None) -> "Pipeline":
        """The model (a name, a .safetensors path or a run folder), ready to generate.

        torch's CPU threads are chosen as the CLI chooses them (see ``minidiff_cli.runtime.threads``),
        once per process: ``threads=N`` (or ``MINIDIFF_THREADS``, ``OMP_NUM_THREADS``) sets the count."""
        from minidiff_cli.runtime.threads import apply_threads, ensure_threads

        if threads is not None:
            apply_threads(threads)
        else:
            ensure_threads()
        path = resolve_model(model)
        dev = pick_device(device)
        torch_dtype = pick_dtype(dtype, dev)
        loaded = DiffusionModel.load(path, device=dev)
        loaded.unet.to(dtype=torch_dtype)
        pipe = cls(loaded, name=loaded.config.get("name") or path.stem, dtype=torch_dtype)
        pipe.source = path  # the file it came from (for files that travel with it, such as its run's CLIP)
        return pipe

    @property
    def device(self) -> torch.device:
        return self.model.device

    def sampling_defaults(self) -> dict[str, Any]:
        """The sampler, steps and cfg the model file asks for ({} for most models)."""
        from minidiff_cli.diffusion.student import sampling_defaults

        return sampling_defaults(self.model.config, self.model.schedule.num_timesteps)

    def image_start(self, init_image, strength: float | None = None, mask=None, resample: int = 0):
        """An init image (and mask) fitted to this model, for ``Generation.init``."""
        from minidiff_cli.inference.img2img.settings import image_start

        return image_start(init_image, size=self.model.image_size, channels=self.model.channels,
                           strength=strength, mask=mask, resample=resample)

    def generate(self, prompt: str, steps: int | None = None, cfg: float | None = None, sampler: str | None = None,
                 seed: int = 0,
                 num_images: int = 1, *, negative: str = "", eta: float | None = None,
                 batch_size: int | None = None, callback: Callable[[dict], None] | None = None,
                 init_image=None, strength: float | None = None, mask=None, resample: int = 0,
                 **sampler_options: Any) -> list:
        """Images for ``prompt`` as PIL images; each carries its parameters in ``.info``.

        ``init_image`` (a path or PIL image) starts from a picture (SDEdit): ``strength`` 0 keeps
        it, 1 redraws it from noise (default 0.8). ``mask`` (white = repaint, black = keep) inpaints
        (default strength 1); ``resample`` adds RePaint's jumps. See ``minidiff_cli.inference.img2img``.
        Save them with ``Pipeline.save(image, path)``: PIL's own ``image.save`` drops ``.info``.
        ``steps``, ``cfg`` and ``sampler`` default to what the model file asks for (a distilled
        student's few steps), else 50, 3 and "ddim".
        """
        defaults = {"steps": 50, "cfg": 3.0, "sampler": "ddim", **self.sampling_defaults()}
        steps = defaults["steps"] if steps is None else steps
        cfg = defaults["cfg"] if cfg is None else cfg
        sampler = defaults["sampler"] if sampler is None else sampler
        gen = Generation(prompt, negative or "", steps, float(cfg), sampler, seed, eta, sampler_options)
        if init_image is not None:
            gen.init = self.image_start(init_image, strength, mask, resample)
        elif mask is not None or strength is not None or resample:
            raise MinidiffError("strength, mask and resample need an init_image")
        return self.images(gen, num_images, batch_size=batch_size, callback=callback)

    def images(self, gen: Generation, num_images: int = 1, *, batch_size: int | None = None,
               callback: Callable[[dict], None] | None = None) -> list:
        """``generate`` for a Generation: PIL images, each with its parameters in ``.info``."""
        x = self.sample(gen, num_images, batch_size=batch_size, callback=callback)
        return [self.image(img, gen, k) for k, img in enumerate(x)]

    def image(self, x: torch.Tensor, gen: Generation, index: int):
        """One sample [C, H, W] in [-1, 1] as a PIL image with the parameters of ``gen``'s image ``index``."""
        return self._to_image(x, gen.params(self.name, self.model.hash, self.model.image_size, index))

    def sample(self, gen: Generation, num_images: int = 1, *, batch_size: int | None = None,
               callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """Samples of ``gen.prompt`` in [-1, 1], a [N, C, H, W] float32 CPU tensor; image k uses seed + k."""
        self._check(gen, num_images)
        if num_images > MAX_IMAGES:
            raise MinidiffError(f"at most {MAX_IMAGES:,} images at once (got {num_images:,}); run several times")
        seeds = [gen.seed + k for k in range(num_images)]
        return self.sample_many(gen, [gen.prompt] * num_images, seeds, batch_size=batch_size, callback=callback)

    def sample_many(self, gen: Generation, prompts: list[str], seeds: list[int], *, batch_size: int | None = None,
                    callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """One image per (prompt, seed) pair, batched; ``gen`` gives everything else."""
        sampler = plugins.get_sampler(gen.sampler)
        self._check(gen, len(prompts))
        if gen.init is not None:
            from minidiff_cli.inference.img2img.run import require_partial

            require_partial(sampler, _who(gen.sampler))
            gen.init.check_fits(self.model.channels, self.model.image_size)
        for prompt in prompts:
            check_text("prompt", prompt)
        for seed in seeds:
            if not is_int(seed) or not 0 <= seed <= MAX_SEED:
                raise MinidiffError(f"seed must be a whole number from 0 to {MAX_SEED} (got {seed!r:.40})")
        opts = dict(gen.sampler_options)
        if gen.eta is not None:
            opts["eta"] = gen.eta
        if batch_size is not None and (not is_int(batch_size) or batch_size < 1):
            raise MinidiffError(f"batch size must be at least 1 (got {batch_size!r:.40})")
        if len(prompts) != len(seeds):
            raise MinidiffError(f"need one seed per prompt: got {len(seeds)} for {len(prompts)} prompts")
        batch_size = batch_size or min(len(prompts), 16)
        self.model.unet.config.check_activations(min(batch_size, len(prompts)))  # before any is allocated
        if self.model.latent is not None:  # a latent model decodes the batch with its VAE
            self.model.latent.autoencoder.check_size(self.model.image_size, min(batch_size, len(prompts)))
        out = []
        for start in range(0, len(prompts), batch_size):
            rows = slice(start, start + batch_size)
            out.append(self._sample_batch(gen, sampler, prompts[rows], seeds[rows], opts, callback, start, len(prompts)))
        return torch.cat(out)

    def _check(self, gen: Generation, num_images: int) -> None:
        """Every value of ``gen`` in range, before any work: a bad one is a one-line MinidiffError."""
        T = self.model.schedule.num_timesteps
        if not is_int(gen.steps) or not 1 <= gen.steps <= T:
            raise MinidiffError(f"steps must be between 1 and {T} for this model (got {gen.steps!r:.40})")
        if not _is_number(gen.cfg) or not 0 <= gen.cfg <= MAX_CFG:
            raise MinidiffError(f"cfg must be 0 or more, at most {MAX_CFG:g} (got {gen.cfg!r:.40})")
        if gen.eta is not None and (not _is_number(gen.eta) or not 0 <= gen.eta <= 1):
            raise MinidiffError(f"eta must be between 0 and 1 (got {gen.eta!r:.40})")
        if not is_int(num_images) or num_images < 1:
            raise MinidiffError(f"the number of images must be at least 1 (got {num_images!r:.40})")
        if not is_int(gen.seed) or not 0 <= gen.seed or gen.seed + num_images - 1 > MAX_SEED:
            raise MinidiffError(f"seed must be a whole number from 0 to {MAX_SEED - num_images + 1} "
                                f"(got {gen.seed!r:.40})")
        for what, text in (("prompt", gen.prompt), ("negative prompt", gen.negative_prompt)):
            check_text(what, text)
        if not isinstance(gen.sampler_options, dict):
            raise MinidiffError("sampler options must be a dict of option names and values")
        clash = sorted(set(gen.sampler_options) & set(RESERVED_OPTIONS))
        if clash:
            raise MinidiffError(f"'{clash[0]}' is not a sampler option: the pipeline passes it itself")

    def _sample_batch(self, gen, sampler, prompts, seeds, opts, callback, start, total) -> torch.Tensor:
        model, n = self.model, len(seeds)
        shape = (n, *model.latent_shape)  # a latent model samples latents, decoded at the end
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        # The sampler's state stays float32 whatever the network's dtype: near t = 0, 1 - alpha_bar
        # is below bfloat16's resolution at 1, and the update would divide by zero.
        x = noise_like(torch.empty(shape, device=self.device, dtype=torch.float32), generators)
        cond, uncond = self._conditionings(prompts, gen.negative_prompt)
        denoiser = guided_denoiser(model, cond, uncond, gen.cfg)

        decode = {"decode": model.decode} if model.latent is not None else {}  # for callbacks that show x

        def report(info: dict) -> None:
            if callback is not None:
                callback({**info, **decode, "batch_start": start, "batch_size": n, "num_images": total})

        def run(denoiser, x, opts):
            return _run_sampler(sampler, gen.sampler, denoiser, x, model.schedule, gen.steps, generators, report, opts)

        with torch.inference_mode():
            if gen.init is None:
                x0 = model.decode(run(denoiser, x, opts))
            else:
                from minidiff_cli.inference.img2img.latent import from_latents, to_latents
                from minidiff_cli.inference.img2img.run import sample_from

                start_at = to_latents(gen.init, model)
                z0 = sample_from(start_at, sampler, _who(gen.sampler), denoiser, x, model.schedule, gen.steps,
                                 generators, opts, run)
                x0 = from_latents(z0, gen.init, model)
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
    def save(image, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write a generated image as a PNG with its parameters (what `minidiff info` and
        `generate --from` read), atomically, never replacing a file unless ``overwrite``."""
        from minidiff_cli.files.png_parameters import save_png

        params = image.info.get("minidiff")
        if not isinstance(params, dict):
            raise MinidiffError("this image has no minidiff parameters; Pipeline.save takes images from "
                                "Pipeline.generate")
        return save_png(image, path, params, overwrite=overwrite)

    @staticmethod
    def _to_image(x: torch.Tensor, params: dict[str, Any]):
        from PIL import Image

        array = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        image.info["minidiff"] = params
        return image


def check_text(what: str, text) -> None:
    """A prompt must be a string of at most MAX_PROMPT_CHARS that can be stored (UTF-8) in a PNG."""
    if not isinstance(text, str):
        raise MinidiffError(f"the {what} must be text (got {type(text).__name__})")
    if len(text) > MAX_PROMPT_CHARS:
        raise MinidiffError(f"the {what} is longer than {MAX_PROMPT_CHARS:,} characters; shorten it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MinidiffError(f"the {what} holds characters that are not valid text (undecodable bytes?)") from None


def _is_number(value) -> bool:
    """A finite real number (numpy scalars too), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _run_sampler(sampler, name: str, denoiser, x: torch.Tensor, schedule, steps: int, generators, callback,
                 opts: dict) -> torch.Tensor:
    """Call a sampler and check what it returns: a plugin's mistake is a one-line error naming the plugin.

    A sampler must return x_0 shaped like x and finite. An exception that is not a MinidiffError
    (a bug, or garbage from the plugin) becomes a PluginError; its traceback stays in ``__cause__``
    for ``--debug``.
    """
    who = _who(name)
    in_model = []

    def watched(x_t, t):
        try:
            return denoiser(x_t, t)
        except Exception:
            in_model.append(True)
            raise

    try:
        x0 = sampler.sample(watched, x, schedule, steps, generator=generators, callback=callback, **opts)
    except MinidiffError:
        raise
    except Exception as exc:
        where = " in the model it called" if in_model else ""
        raise PluginError(f"{who} failed{where}: {type(exc).__name__}: {first_line(exc)}") from exc
    if not torch.is_tensor(x0):
        raise PluginError(f"{who} returned {type(x0).__name__}, not a tensor of shape {tuple(x.shape)}")
    if tuple(x0.shape) != tuple(x.shape):
        raise PluginError(f"{who} returned a tensor of shape {tuple(x0.shape)}, expected {tuple(x.shape)}")
    if not (x0.is_floating_point() and torch.isfinite(x0).all()):
        bad = "NaN or infinite values" if x0.is_floating_point() else f"a {x0.dtype} tensor, not floats"
        raise PluginError(f"{who} returned {bad}")
    if x0.dtype != x.dtype:  # a float16 result would silently lose precision in what follows
        raise PluginError(f"{who} returned a {x0.dtype} tensor, expected {x.dtype} like its input")
    return x0


def _who(name: str) -> str:
    return f"sampler '{name}' (plugin '{_owner(name)}')"


def _owner(name: str) -> str:
    try:
        return plugins.registry().owner("samplers", name)
    except KeyError:
        return "unknown"
