"""AUTOMATIC1111's web API, as far as minidiff has the feature: request fields, checks, answers.

Field names, defaults and answer shapes follow AUTOMATIC1111's ``/sdapi/v1`` (what ``webuiapi``
and other clients send and read). Each field minidiff uses is bounded here, by pydantic, before
any work; any other field is accepted and, where it was given a value that would change the
picture, named in one note of the answer's ``info``. Where minidiff's default differs
(steps, CFG scale and sampler default to the model's own, as ``generate``'s do; no width and
height means the model's size), the request decides when it gives a value.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from minidiff_cli import __version__
from minidiff_cli.errors import MinidiffError
from minidiff_cli.server import limits
from minidiff_cli.server.plan import (
    Plan,
    check_count,
    check_size,
    ignored_note,
    pick_seed,
    resolve_sampler,
    takes_eta,
)

Prompt = Annotated[str, Field(max_length=limits.MAX_PROMPT_CHARS)]
Name = Annotated[str, Field(max_length=limits.MAX_NAME_CHARS)]
Picture = Annotated[str, Field(max_length=limits.MAX_BASE64_CHARS)]


class Txt2Img(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: Prompt = ""
    negative_prompt: Prompt = ""
    steps: Optional[int] = Field(None, ge=1, le=limits.MAX_STEPS)
    cfg_scale: Optional[float] = Field(None, ge=0, le=limits.MAX_CFG, allow_inf_nan=False)
    sampler_name: Optional[Name] = None
    sampler_index: Optional[Name] = None  # older clients send the sampler's name here
    scheduler: Optional[Name] = None
    seed: int = Field(-1, ge=-1, le=limits.MAX_SEED)
    batch_size: int = Field(1, ge=1, le=limits.MAX_IMAGES)
    n_iter: int = Field(1, ge=1, le=limits.MAX_IMAGES)
    width: Optional[int] = Field(None, ge=0, le=limits.MAX_SIDE)
    height: Optional[int] = Field(None, ge=0, le=limits.MAX_SIDE)
    eta: Optional[float] = Field(None, ge=0, le=1, allow_inf_nan=False)
    override_settings: Optional[dict[Name, Any]] = None


class Img2Img(Txt2Img):
    init_images: list[Picture] = Field(min_length=1, max_length=1)
    denoising_strength: float = Field(0.75, ge=0, le=1, allow_inf_nan=False)
    mask: Optional[Picture] = None
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: Optional[Name] = None


class PngInfo(BaseModel):
    image: Picture


def model_of(req: Txt2Img, catalogue, current):
    """The model a request runs on: ``override_settings.sd_model_checkpoint``, else the current one."""
    wanted = (req.override_settings or {}).get("sd_model_checkpoint")
    return catalogue.find(wanted) if wanted else current


def to_plan(req: Txt2Img, model, open_picture=None) -> Plan:
    """The checked plan of a txt2img or img2img request (pictures opened by ``open_picture``)."""
    check_count(req.batch_size, req.n_iter)
    count = req.batch_size * req.n_iter
    width, height = check_size(req.width, req.height, count)
    sampler, options = resolve_sampler(req.sampler_name or req.sampler_index, req.scheduler)
    plan = Plan(model, req.prompt, req.negative_prompt, req.steps, req.cfg_scale, sampler, options,
                seed=pick_seed(req.seed, count), batch_size=req.batch_size, n_iter=req.n_iter, width=width,
                height=height)
    if req.eta is not None:
        if takes_eta(sampler or "ddim"):
            plan.eta = req.eta
        else:
            plan.notes.append(f"eta ignored: sampler {sampler} takes none")
    extra = dict(req.model_extra or {})
    extra.pop("sampler_index", None)
    other = {k: v for k, v in (req.override_settings or {}).items() if k != "sd_model_checkpoint"}
    if other:
        plan.notes.append("override_settings ignored but for sd_model_checkpoint: " + ", ".join(sorted(other)[:10]))
    if isinstance(req, Img2Img):
        plan.init_image = open_picture(req.init_images[0], "init_images[0]")
        plan.strength = req.denoising_strength
        if req.mask is not None:
            plan.mask = _mask(open_picture(req.mask, "mask"), invert=bool(req.inpainting_mask_invert))
    note = ignored_note(extra)
    if note:
        plan.notes.append(note)
    return plan


def _mask(image, invert: bool):
    """The mask as grey levels (white repaints); AUTOMATIC1111's "inpaint not masked" inverts it."""
    from PIL import ImageOps

    from minidiff_cli.data.images import to_rgb

    grey = to_rgb(image).convert("L")
    return ImageOps.invert(grey) if invert else grey


def answer(req: Txt2Img, plan: Plan, drawn, images: list[str], texts: list[str]) -> dict:
    """AUTOMATIC1111's answer: ``images``, the request as ``parameters``, and ``info`` as a JSON string."""
    params = req.model_dump()
    if isinstance(req, Img2Img) and not req.include_init_images:
        params["init_images"], params["mask"] = None, None  # as AUTOMATIC1111 does: not sent back
    first = drawn.images[0].info["minidiff"] if drawn.images else {}
    seeds = [image.info["minidiff"]["seed"] for image in drawn.images]
    info = {
        "prompt": plan.prompt, "all_prompts": [plan.prompt] * len(seeds), "negative_prompt": plan.negative,
        "all_negative_prompts": [plan.negative] * len(seeds), "seed": plan.seed, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
        "width": plan.width or drawn.native, "height": plan.height or drawn.native,
        "sampler_name": first.get("sampler"), "cfg_scale": first.get("cfg"), "steps": first.get("steps"),
        "batch_size": plan.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": plan.model.name, "sd_model_hash": plan.model.hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": plan.strength,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": texts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1, "is_using_inpainting_conditioning": False,
        "version": f"minidiff {__version__}", "notes": drawn.notes, "interrupted": drawn.interrupted,
        "native_size": drawn.native,
    }
    return {"images": images, "parameters": params, "info": json.dumps(info)}


def samplers() -> list[dict]:
    """AUTOMATIC1111's names for the samplers minidiff has, then minidiff's own names."""
    from minidiff_cli import plugins
    from minidiff_cli.inference.infotext import KARRAS_SAMPLERS

    installed = plugins.registry().names("samplers")
    a1111 = {"euler-ancestral": "Euler a", "euler": "Euler", "heun": "Heun", "dpmpp-2m": "DPM++ 2M",
             "ddim": "DDIM", "ddpm": "DDPM"}
    out = []
    for name in installed:
        if name in a1111:
            out.append({"name": a1111[name], "aliases": [name], "options": {}})
            if name in KARRAS_SAMPLERS:
                out.append({"name": f"{a1111[name]} Karras", "aliases": [], "options": {"scheduler": "karras"}})
    for name in installed:
        out.append({"name": name, "aliases": [], "options": {}})
    return out


def options(current) -> dict:
    return {"sd_model_checkpoint": current.title, "sd_checkpoint_hash": current.sha256, "samples_format": "png",
            "sd_vae": "None", "CLIP_stop_at_last_layers": 1}


def progress(board, preview_png) -> dict:
    """AUTOMATIC1111's /progress: the running job (the first, if several models run), its step and picture."""
    running = board.running()
    job = running[0] if running else None
    count = board.job_count()
    state = {"skipped": False, "interrupted": bool(job and job.interrupted.is_set()), "job": job.label if job else "",
             "job_count": count, "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "job_no": board.finished,
             "sampling_step": job.steps_done if job else 0, "sampling_steps": job.steps_total if job else 0}
    return {"progress": job.progress() if job else 0.0, "eta_relative": job.eta() if job else 0.0,
            "state": state, "current_image": preview_png(job) if job else None, "textinfo": None,
            "current_task": job.label if job else None}


def png_info(texts: dict[str, str]) -> dict:
    """AUTOMATIC1111's /png-info: the parameters text, the other text chunks, the text split into fields."""
    from minidiff_cli.inference.infotext import parse

    text = texts.get("parameters", "")
    parameters: dict[str, Any] = {}
    if text:
        try:
            parsed = parse(text, "image")
        except MinidiffError:
            parsed = None
        if parsed is not None:
            parameters = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt, **parsed.settings}
    items = {k: v for k, v in texts.items() if k != "parameters"}
    return {"info": text, "items": items, "parameters": parameters}


# The lists a client probes at start; minidiff has none of these things, and says so validly.
EMPTY_LISTS = ("loras", "embeddings", "sd-vae", "upscalers", "hypernetworks", "face-restorers",
               "realesrgan-models", "prompt-styles", "latent-upscale-modes", "sd-modules")


def empty(kind: str) -> Any:
    if kind == "embeddings":
        return {"loaded": {}, "skipped": {}}
    return []


def scripts() -> dict:
    return {"txt2img": [], "img2img": []}


def schedulers() -> list[dict]:
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
            {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]
