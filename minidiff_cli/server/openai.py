"""OpenAI's ``POST /v1/images/generations`` (as stable-diffusion.cpp's server answers it).

``prompt``, ``n``, ``size`` ("WxH", "auto" or none: the model's size) and ``response_format``
(``b64_json`` only: the server keeps no files to point a URL at); ``model`` names an installed
model. Everything else about the picture is the model's default, as ``generate`` with no flags.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from minidiff_cli.errors import MinidiffError, shown
from minidiff_cli.server import limits
from minidiff_cli.server.plan import Plan, check_size, ignored_note, pick_seed

Name = Annotated[str, Field(max_length=limits.MAX_NAME_CHARS)]


class Generations(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: Annotated[str, Field(min_length=1, max_length=limits.MAX_PROMPT_CHARS)]
    n: int = Field(1, ge=1, le=limits.MAX_IMAGES)
    size: Optional[Annotated[str, Field(max_length=20)]] = None
    response_format: Literal["b64_json"] = "b64_json"
    model: Optional[Name] = None
    seed: Optional[int] = Field(None, ge=-1, le=limits.MAX_SEED)  # stable-diffusion.cpp's extension
    negative_prompt: Annotated[str, Field(max_length=limits.MAX_PROMPT_CHARS)] = ""


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    width, x, height = size.lower().partition("x")
    if not (x and width.isdigit() and height.isdigit() and 0 < int(width) <= limits.MAX_SIDE
            and 0 < int(height) <= limits.MAX_SIDE):
        raise MinidiffError(f"size must be WIDTHxHEIGHT, each 1 to {limits.MAX_SIDE}, or auto (got {shown(size)})")
    return int(width), int(height)


def to_plan(req: Generations, model) -> Plan:
    width, height = check_size(*parse_size(req.size), req.n)
    plan = Plan(model, req.prompt, req.negative_prompt, seed=pick_seed(req.seed, req.n), batch_size=req.n,
                width=width, height=height)
    note = ignored_note(dict(req.model_extra or {}))
    if note:
        plan.notes.append(note)
    return plan


def answer(images: list[str], plan: Plan) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": b64, "revised_prompt": plan.prompt} for b64 in images]}
