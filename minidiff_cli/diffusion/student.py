"""A few-step student: a model file that holds only a low-rank adapter and names its teacher.

``minidiff distill`` trains an adapter (``nets/lora.py``) on the teacher's U-Net. Its model
file is an ordinary minidiff model file whose tensors are ``adapter.<layer>.down`` and
``adapter.<layer>.up`` alone (float16), and whose config is the teacher's (U-Net, schedule, conditioner,
prediction, VAE) plus two entries:

    "student":  {"teacher": {"name": "shapes-clip", "hash": "<the teacher file's hash>"},
                 "method": "lcm", "rank": 16, "alpha": 16.0, "guidance": 3.0}
    "sampling": {"sampler": "lcm", "steps": 4, "cfg": 1.0}

Loading finds the teacher by its name among the installed and run models, beside the student
file, or as the model of a run folder beside the student's run folder, and uses it only if its
hash matches; it never follows a path written in the
file (a student file can be hostile). The teacher's config must equal the student's copy,
the adapter must fit the teacher's layers exactly, and then the adapter is merged into the
teacher's weights once: the student costs what the teacher costs per step.

``sampling`` is what ``generate`` defaults to for this model (any model file may carry it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from minidiff_cli.errors import MinidiffError, ModelFileError, is_int
from minidiff_cli.files.model_file import check_entries, file_hash, load_finite_tensors
from minidiff_cli.nets import lora
from minidiff_cli.nets.unet import UNet, UNetConfig

ADAPTER = "adapter"  # the prefix of a student file's tensors
ADAPTER_DTYPE = torch.float16  # how a student file stores them: half the bytes; merged in float32
METHODS = ("lcm", "mcm", "lct")  # consistency distillation, multistep, consistency training (training/distill.py)
SHARED = ("unet", "schedule", "conditioner", "prediction", "vae")  # what a student copies from its teacher
HASH = re.compile(r"[0-9a-f]{10}")
RUN_NAME = re.compile(r"(runs/)?[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a model's name, never a path
MAX_GUIDANCE = 1000.0
MAX_CANDIDATES = 50  # model files beside a student that may be hashed in search of its teacher


def is_student(config: dict[str, Any]) -> bool:
    return "student" in config


def student_entry(config: dict[str, Any]) -> dict[str, Any]:
    """The checked ``student`` entry of a config: teacher name and hash, method, rank, alpha, guidance."""
    entry = config.get("student")
    if not isinstance(entry, dict) or not isinstance(entry.get("teacher"), dict):
        raise MinidiffError("student must be an object with a teacher")
    name, want = entry["teacher"].get("name"), entry["teacher"].get("hash")
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or ".." in name:
        raise MinidiffError(f"student.teacher.name must be a model's name, not a path (got {name!r:.60})")
    if not isinstance(want, str) or not HASH.fullmatch(want):
        raise MinidiffError(f"student.teacher.hash must be 10 hexadecimal digits (got {want!r:.40})")
    if entry.get("method") not in METHODS:
        raise MinidiffError(f"unknown distillation method {entry.get('method')!r:.40}; known: {', '.join(METHODS)}")
    lora.check_rank(entry.get("rank"), entry.get("alpha"))
    guidance = entry.get("guidance", 1.0)
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not 0 <= guidance <= MAX_GUIDANCE:
        raise MinidiffError(f"student.guidance must be a number from 0 to {MAX_GUIDANCE:g} (got {guidance!r:.40})")
    return entry


def sampling_defaults(config: dict[str, Any], num_timesteps: int | None = None) -> dict[str, Any]:
    """What ``generate`` should default to for this model: {"sampler", "steps", "cfg"}, each only if set.

    A hostile file may put anything here; a value of the wrong kind is a MinidiffError.
    """
    entry = config.get("sampling")
    if entry is None:
        return {}
    if not isinstance(entry, dict) or set(entry) - {"sampler", "steps", "cfg"}:
        raise MinidiffError("sampling must be an object with sampler, steps and cfg")
    out = {}
    if "sampler" in entry:
        name = entry["sampler"]
        if not isinstance(name, str) or not 0 < len(name) <= 100 or not name.isprintable():
            raise MinidiffError(f"sampling.sampler must be a sampler's name (got {name!r:.40})")
        out["sampler"] = name
    if "steps" in entry:
        steps, top = entry["steps"], num_timesteps or 100_000
        if not is_int(steps) or not 1 <= steps <= top:
            raise MinidiffError(f"sampling.steps must be a whole number from 1 to {top} (got {steps!r:.40})")
        out["steps"] = steps
    if "cfg" in entry:
        cfg = entry["cfg"]
        if not isinstance(cfg, (int, float)) or isinstance(cfg, bool) or not 0 <= cfg <= MAX_GUIDANCE:
            raise MinidiffError(f"sampling.cfg must be a number from 0 to {MAX_GUIDANCE:g} (got {cfg!r:.40})")
        out["cfg"] = float(cfg)
    return out


def expected_tensors(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The adapter tensors (on the meta device) that a student of this config must hold, by name."""
    entry = student_entry(config)
    with torch.device("meta"):
        unet = UNet(UNetConfig.from_dict(config["unet"]))
        adapters = lora.add_adapters(unet, entry["rank"], float(entry["alpha"]))
    return {f"{ADAPTER}.{k}": v.to(ADAPTER_DTYPE) for k, v in lora.adapter_tensors(adapters).items()}


def check_student_file(path: Path, config: dict[str, Any], entries: dict[str, dict]) -> None:
    """The header of a student file fits its config: exactly the adapter tensors, shaped for the U-Net."""
    try:
        expected = expected_tensors(config)
    except (MinidiffError, KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"'{path}' has an invalid student config: {exc}") from None
    check_entries(f"'{path}'", expected, entries)


def find_teacher(config: dict[str, Any], student: Path) -> Path:
    """The teacher's file: by its name among the models ``--model`` knows, else beside the student,
    in both cases only a file whose hash is the one the student names."""
    from minidiff_cli.files.models_dir import RUN_MODEL, list_models

    teacher = student_entry(config)["teacher"]
    name, want = teacher["name"], teacher["hash"]
    named = [path for stem, path, _ in list_models() if stem == name]
    beside = sorted(student.parent.glob("*.safetensors"))[:MAX_CANDIDATES]
    # Run folders side by side (runs/shapes and runs/shapes-fast): the teacher's model.safetensors.
    runs = sorted(student.parent.parent.glob(f"*/{RUN_MODEL}"))[:MAX_CANDIDATES]
    for candidate in named + beside + runs:
        if candidate.is_file() and candidate.resolve() != student.resolve() and file_hash(candidate) == want:
            return candidate
    seen = "a file of that name with another hash" if named else "no model of that name"
    raise ModelFileError(f"'{student}' is a student of the model '{name}' (hash {want}), which is not here "
                         f"({seen}); install that teacher, or put its file beside the student or its run folder "
                         "beside the student's")


def merge_into_teacher(teacher, student: Path, config: dict[str, Any]):
    """The teacher model with the student file's adapter merged into its U-Net, under the student's config."""
    entry = student_entry(config)
    differs = [key for key in SHARED if config.get(key) != teacher.config.get(key)]
    if differs:
        raise ModelFileError(f"'{student}' was not distilled from this teacher: its {differs[0]} differs")
    tensors = load_finite_tensors(student)
    adapter = {k[len(ADAPTER) + 1:]: v for k, v in tensors.items() if k.startswith(ADAPTER + ".")}
    try:
        lora.merge(teacher.unet, adapter, entry["rank"], float(entry["alpha"]))
    except MinidiffError as exc:
        raise ModelFileError(f"'{student}': {exc}") from None
    teacher.config = config
    teacher.hash = file_hash(student)
    return teacher
