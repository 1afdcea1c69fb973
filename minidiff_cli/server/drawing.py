"""A plan drawn by a loaded pipeline, in the model's worker thread: the same calls as ``generate``.

``generate -n N --batch-size B --seed S`` samples batches of B images with seeds S, S + 1, ...;
a request of batch_size B and n_iter K samples the same K batches of B, so its pictures are
``generate``'s bit for bit. Requests are not merged into one batch: the pictures a batch gives
depend (in their last bits) on what else is in it, and that would break the promise.

An interrupted job answers with what it has: the finished batches, and for the running one the
model's current guess of x_0 (the step callback's), decoded as the finished ones are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minidiff_cli.server.jobs import Cancelled, Job
from minidiff_cli.server.plan import Plan, size_note


@dataclass
class Drawn:
    images: list            # PIL images at the model's size, each with its parameters in .info["minidiff"]
    native: int             # the model's size
    seed: int
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False


def draw(pipe, plan: Plan, job: Job) -> Drawn:
    from minidiff_cli.inference.pipeline import Generation

    defaults = {"steps": 50, "cfg": 3.0, "sampler": "ddim", **pipe.sampling_defaults()}
    steps = plan.steps if plan.steps is not None else defaults["steps"]
    cfg = plan.cfg if plan.cfg is not None else defaults["cfg"]
    sampler = plan.sampler or defaults["sampler"]
    gen = Generation(plan.prompt, plan.negative, steps, float(cfg), sampler, plan.seed, plan.eta,
                     dict(plan.sampler_options))
    notes = list(plan.notes)
    if plan.init_image is not None:
        gen.init = pipe.image_start(plan.init_image, plan.strength, plan.mask)
        notes += [f"{note} (the picture sent)" for note in gen.init.notes]
    pipe.check_prompt(gen.prompt, gen.negative_prompt)  # the conditioner's refusal, before any step
    pipe._check(gen, plan.count)
    job.steps_total = gen.steps_taken() * plan.n_iter
    images, interrupted = [], False
    for batch in range(plan.n_iter):
        start = batch * plan.batch_size
        seeds = [plan.seed + start + k for k in range(plan.batch_size)]
        try:
            x = pipe.sample_many(gen, [gen.prompt] * plan.batch_size, seeds, batch_size=plan.batch_size,
                                 callback=job.step)
        except Cancelled:
            if job.cancelled.is_set():
                raise
            interrupted = True
            x = _current_guess(job, plan.batch_size)
        images += [pipe.image(img, gen, start + k) for k, img in enumerate(x)]
        if interrupted:
            notes.append(f"interrupted at step {job.steps_done} of {job.steps_total}: the last batch is the "
                         "model's current guess")
            break
    note = size_note(plan, pipe.model.image_size)
    if note:
        notes.append(note)
    return Drawn(images, pipe.model.image_size, plan.seed, notes, interrupted)


def _current_guess(job: Job, batch_size: int):
    """The running batch's current x_0 guess as pictures in [-1, 1] (none before its first step)."""
    import torch

    if job.preview is None or job.steps_done == 0:
        return torch.empty(0)
    return preview_pixels(job, batch_size)


def preview_pixels(job: Job, count: int = 1):
    """The job's current guess of its first ``count`` pictures, [n, C, H, W] in [-1, 1] on the CPU."""
    import torch

    x0, decode = job.preview
    with torch.inference_mode():
        x = decode(x0[:count]) if decode is not None else x0[:count]
    return x.float().clamp(-1, 1).cpu()
