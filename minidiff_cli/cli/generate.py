"""``minidiff generate``: prompt in, PNGs out (with their parameters inside)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from minidiff_cli.cli import completion
from minidiff_cli.cli.app import app
from minidiff_cli.cli.generate_init import image_start, open_init_files
from minidiff_cli.cli.options import model_sampling_defaults, threads_option
from minidiff_cli.errors import MinidiffError, shown
from minidiff_cli.files.atomic import missing_folders
from minidiff_cli.runtime.threads import apply_threads

# Used when neither a flag nor --from gives a value.
DEFAULTS = {"negative_prompt": "", "steps": 50, "cfg": 3.0, "sampler": "ddim", "seed": 0, "eta": None,
            "sampler_options": None, "strength": None, "resample": None, "init_image_hash": None, "mask_hash": None}


@app.command("generate")
def generate_command(
    ctx: typer.Context,
    prompt: Optional[str] = typer.Argument(None, help="What to draw, e.g. \"a red circle\"."),
    model: Optional[str] = typer.Option(None, "--model", "-m", autocompletion=completion.models, help="Model name or .safetensors path "
                                        "[default: the shipped model]."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps [default: the model's, else 50; a distilled student says 1 to 4]."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance scale: 0 ignores the "
                                        "prompt, 1 is plain conditioning (at 0 and 1 the network runs once per step, "
                                        "not twice) [default: the model's, else 3; 1 for a student with guidance folded in]."),
    sampler: Optional[str] = typer.Option(None, "--sampler", autocompletion=completion.samplers, help="Sampler name (see `minidiff plugins`) "
                                          "[default: the model's, else ddim]."),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM noise: 0 deterministic, 1 like DDPM."),
    negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt: steer away from it."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the first image; image k uses seed + k "
                                       "[default: 0]."),
    num_images: int = typer.Option(1, "--num-images", "-n", help="How many images."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images sampled at once [default: up to 16]."),
    output: str = typer.Option("outputs", "--output", "-o", help="Folder for numbered PNGs, or a FILE.png (a name "
                               "ending in / is always a folder)."),
    grid: bool = typer.Option(False, "--grid", help="Also save all images as one grid PNG."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    from_image: Optional[Path] = typer.Option(None, "--from", help="Repeat the parameters stored in a PNG; "
                                              "flags given override them."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON on stdout."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files of an -o FILE.png (and "
                                   "their trajectory files) or --prompts' line files; in a folder, images always get "
                                   "new numbers."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no terminal preview."),
    save_trajectory: bool = typer.Option(False, "--save-trajectory", help="Also save, next to each image, a strip "
                                         "and a GIF of x_t and the predicted x0 along the steps."),
    init_image: Optional[Path] = typer.Option(None, "--init-image", help="Start from this picture (PNG, JPEG or "
                                              "WebP; fitted to the model's size) instead of pure noise."),
    strength: Optional[float] = typer.Option(None, "--strength", help="With --init-image: how much to redraw, 0 "
                                             "keeps the picture, 1 starts from noise; runs the last strength x steps "
                                             "[default: 0.8, with --mask 1]."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="With --init-image: inpaint; white repaints, black "
                                        "keeps (exactly), grey blends. Same size as the init image."),
    resample: Optional[int] = typer.Option(None, "--resample", help="With --mask: RePaint's resampling, N jumps "
                                           "back per step for better seams (N + 1 times the model calls) [default: 0]."),
    sampler_option: Optional[list[str]] = typer.Option(None, "--sampler-option", "-O", help="A sampler option "
                                                       "KEY=VALUE, repeatable, e.g. -O spacing=leading -O karras=true."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="A file of prompts (- reads standard input), one a line, or JSON "
                                                "lines with overrides: {\"prompt\": .., \"negative\", \"seed\", "
                                                "\"steps\", \"cfg\", \"n\"}; writes line-LLLLL-KK.png into the -o "
                                                "folder. Splits the lines over processes under torchrun."),
    threads: Optional[int] = threads_option(),
) -> None:
    """Draw images from a prompt with a trained model.

    Examples:

      minidiff generate "a red circle" --steps 50 --cfg 3

      minidiff generate "a blue square" -n 8 --grid -o out/

      minidiff generate --from outputs/minidiff-00000.png --seed 5

      minidiff generate "a green triangle" --save-trajectory

      minidiff generate "a green circle" --init-image in.png --strength 0.6

      minidiff generate "a blue square" --init-image in.png --mask mask.png

      minidiff generate --prompts prompts.txt -o out/
    """
    apply_threads(threads)
    from minidiff_cli.inference.pipeline import Generation

    given = {"prompt": prompt, "negative_prompt": negative, "steps": steps, "cfg": cfg, "sampler": sampler,
             "seed": seed, "eta": eta, "model": model,
             "sampler_options": _sampler_options(sampler_option) if sampler_option else None,
             "strength": strength, "resample": resample}
    if prompts_file is not None or _under_torchrun():
        given["prompt"] = _prompts_instead_of(prompt, prompts_file, save_trajectory)
    params = _resolve(given, from_image)
    _check_numbers(params, num_images, batch_size)
    output, as_file = output_target(output)
    _check_against_model(params, installed_only=from_image is not None and model is None)
    if prompts_file is not None and as_file:
        raise MinidiffError(f"with --prompts, -o is a folder (images are named line-LLLLL-KK.png in it), "
                            f"not '{output}'")
    init_files = open_init_files(init_image, mask, strength, resample, prompts_file, params["sampler"])
    # A failed or interrupted run must not leave behind an empty folder that it made.
    ctx.call_on_close(_remove_if_empty(missing_folders(output.parent if as_file else output)))
    if prompts_file is not None:
        from minidiff_cli.cli.generate_prompts import FileRun, generate_from_file

        generate_from_file(params, FileRun(prompts_file, output, num_images, batch_size, grid, device, dtype, as_json,
                                           quiet, from_image if model is None else None, overwrite))
        return
    targets = _output_paths(output, num_images, overwrite, as_file)
    if save_trajectory and not overwrite:
        _check_free([p for target in targets for p in _trajectory_paths(target)])

    pipe = _load(params["model"], device, dtype, from_image if model is None else None)
    gen = Generation(params["prompt"], params["negative_prompt"] or "", params["steps"], float(params["cfg"]),
                     params["sampler"], params["seed"], params["eta"], params["sampler_options"] or {})
    gen.init = image_start(pipe, init_files, params, from_image)
    pipe.check_prompt(gen.prompt, gen.negative_prompt)  # a prompt it refuses: the error alone, no warning
    _warn_about_prompt(pipe, params)
    recorder = None
    if save_trajectory:
        from minidiff_cli.inference.trajectory import TrajectoryRecorder

        recorder = TrajectoryRecorder()
    images = _run(pipe, gen, num_images, batch_size, quiet, recorder)
    written = _save(images, targets, output, grid, overwrite, as_file)
    if recorder is not None:
        written += _save_trajectories(recorder, written[:len(images)], overwrite)  # named after the images saved
    if as_json:
        typer.echo(json.dumps({"images": [str(p) for p in written],
                               "parameters": [img.info["minidiff"] for img in images]}, indent=2))
    else:
        for path in written:
            typer.echo(str(path))
    if not quiet and not as_json:  # a picture would garble the JSON on stdout
        from minidiff_cli.cli.display import show_images

        show_images(images)


def _under_torchrun() -> bool:
    from minidiff_cli.runtime.ranks import world_size

    return world_size() > 1


def _prompts_instead_of(prompt: str | None, prompts_file: Path | None, save_trajectory: bool) -> str:
    """The placeholder prompt of a --prompts run (each line brings its own), after checking the flags."""
    if prompts_file is None:
        raise MinidiffError("under torchrun, generate splits the lines of a --prompts FILE over the processes; "
                            "run a single prompt in one process")
    if prompt is not None:
        raise MinidiffError("give a prompt or --prompts FILE, not both")
    if save_trajectory:
        raise MinidiffError("--save-trajectory draws one prompt's steps; it does not combine with --prompts")
    return ""


def _resolve(given: dict[str, Any], from_image: Path | None) -> dict[str, Any]:
    """Flags given > the parameters of --from > defaults."""
    stored: dict[str, Any] = {}
    if from_image is not None:
        from minidiff_cli.inference.infotext import read_for_repeat

        # minidiff's JSON chunk, or what maps from another program's `parameters` text (with a note)
        stored, note = read_for_repeat(from_image, sampler_given=given.get("sampler") is not None)
        if note:
            print(f"minidiff: note: {note}", file=sys.stderr)
        stored = _checked_types(stored, from_image)
    params = {}
    model_defaults = _model_defaults(given.get("model") or (stored.get("model") if from_image else None),
                                     installed_only=given.get("model") is None)
    for key in ("prompt", "model", *DEFAULTS):
        if given.get(key) is not None:
            params[key] = given[key]
        elif key in stored and key != "model":
            params[key] = stored[key]
        else:
            params[key] = model_defaults.get(key, DEFAULTS.get(key))
    if params["prompt"] is None:
        raise MinidiffError("no prompt given; pass one, e.g. minidiff generate \"a red circle\", or use --from IMAGE.png")
    if given.get("model") is None and stored.get("model"):
        if not _is_model_name(stored["model"]):
            # minidiff stores a model's name, never a path: a stranger's PNG must not choose files to open
            raise MinidiffError(f"'{from_image}' names its model {shown(stored['model'])}, which is not a model "
                                "name; pass --model NAME or --model FILE.safetensors")
        params["model"] = stored["model"]
    return params


def _model_defaults(model: str | None, installed_only: bool) -> dict[str, Any]:
    """What the model's file asks generate to default to; a name from a PNG only among installed models."""
    if model is not None and installed_only and not _is_model_name(model):
        return {}
    return model_sampling_defaults(model, installed_only=installed_only and model is not None)


# What each stored parameter must be; a PNG from a stranger may hold anything.
TYPES = {"prompt": (str,), "negative_prompt": (str,), "model": (str,), "sampler": (str,), "steps": (int,),
         "seed": (int,), "cfg": (int, float), "eta": (int, float, type(None)), "sampler_options": (dict, type(None)),
         "strength": (int, float), "resample": (int,), "init_image_hash": (str,), "mask_hash": (str,)}
# null means: not stored
OPTIONAL = ("negative_prompt", "model", "eta", "sampler_options", "strength", "resample", "init_image_hash", "mask_hash")


def _checked_types(stored: dict[str, Any], path: Path) -> dict[str, Any]:
    stored = {k: v for k, v in stored.items() if not (k in OPTIONAL and v is None)}
    for key, types in TYPES.items():
        value = stored.get(key)
        if key in stored and (not isinstance(value, types) or isinstance(value, bool)):
            raise MinidiffError(f"'{path}' has an invalid '{key}' parameter: {shown(value)}")
    return stored


def _is_model_name(name: str) -> bool:
    return (0 < len(name) <= 200 and name.isprintable() and not name.startswith((".", "~"))
            and "/" not in name and "\\" not in name and os.sep not in name
            and not name.lower().endswith(".safetensors"))


def _check_numbers(params: dict[str, Any], num_images: int, batch_size: int | None) -> None:
    """The values given (flags, or a --from PNG) in range, before the model is loaded."""
    from minidiff_cli.inference.pipeline import MAX_CFG, MAX_IMAGES, MAX_SEED, check_text

    steps, cfg, eta, seed = params["steps"], params["cfg"], params["eta"], params["seed"]
    if steps < 1:
        raise MinidiffError(f"--steps must be at least 1 (got {steps})")
    if not cfg >= 0:  # NaN too: it fails every comparison
        raise MinidiffError(f"--cfg must be 0 or more (got {cfg})")
    if cfg > MAX_CFG:
        raise MinidiffError(f"--cfg must be at most {MAX_CFG:g} (got {cfg})")
    if num_images < 1:
        raise MinidiffError(f"--num-images must be at least 1 (got {num_images})")
    if num_images > MAX_IMAGES:
        raise MinidiffError(f"--num-images must be at most {MAX_IMAGES} (got {num_images}); run several times")
    if batch_size is not None and batch_size < 1:
        raise MinidiffError(f"--batch-size must be at least 1 (got {batch_size})")
    if eta is not None and not 0 <= eta <= 1:  # NaN fails both comparisons, so it is refused here
        raise MinidiffError(f"--eta must be between 0 and 1 (got {eta})")
    if not 0 <= seed <= MAX_SEED - num_images + 1:
        raise MinidiffError(f"--seed must be a whole number from 0 to {MAX_SEED - num_images + 1} (got {seed})")
    check_text("prompt", params["prompt"])
    check_text("negative prompt", params["negative_prompt"] or "")


def _check_against_model(params: dict[str, Any], installed_only: bool) -> None:
    """What the plugins and the model file's header tell before any folder is made: the sampler
    exists and the steps fit the model's schedule (loading the model checks both again)."""
    from minidiff_cli import plugins
    from minidiff_cli.files.model_file import read_config
    from minidiff_cli.files.models_dir import resolve_model

    plugins.get_sampler(params["sampler"])
    if installed_only and params["model"] is not None and not _is_model_name(params["model"]):
        return  # _resolve refuses it
    try:
        limit = read_config(resolve_model(params["model"], installed_only=installed_only))["schedule"]["num_timesteps"]
    except (MinidiffError, OSError, KeyError, TypeError):
        return  # a missing or broken file: loading it reports why, in one line
    if isinstance(limit, int) and not isinstance(limit, bool) and params["steps"] > limit:
        raise MinidiffError(f"steps must be between 1 and {limit} for this model (got {params['steps']})")


def _remove_if_empty(folders: list[Path]):
    """A callback removing ``folders`` (deepest first) while they are empty: what a run that
    wrote nothing made, and nothing more."""
    def remove() -> None:
        for folder in folders:
            try:
                folder.rmdir()  # fails on a folder that holds anything
            except OSError:
                return
    return remove


def output_target(raw: str | os.PathLike) -> tuple[Path, bool]:
    """-o as (path, whether it names one PNG file): a folder is a name that ends in a separator,
    an existing folder, or a name without a suffix; otherwise it must end in .png.

    Read from the text as typed: ``Path`` drops a trailing '/', and ``run.v2/`` is a folder."""
    text = os.fspath(raw)
    path = Path(text)
    separators = tuple(sep for sep in (os.sep, os.altsep, "/") if sep)
    if text.endswith(separators) or not path.suffix or os.path.isdir(text):
        return path, False
    if path.suffix.lower() == ".png":
        return path, True
    raise MinidiffError(f"-o '{text}' must be a folder or a .png file; for a new folder whose name has a dot, "
                        f"end it with a slash: -o '{text}/'")


def _output_paths(output: Path, num_images: int, overwrite: bool = False, as_file: bool | None = None) -> list[Path]:
    """Where each image goes; checked before any work so that nothing is half-done."""
    if as_file is None:
        output, as_file = output_target(output)
    try:
        return _free_paths(output, num_images, overwrite, as_file)
    except (OSError, ValueError) as exc:  # e.g. a name longer than the filesystem allows
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise MinidiffError(f"-o '{output}' cannot be used: {reason}") from None


def _taken(path: Path) -> bool:
    """Whether ``path`` exists (a dangling link too); an unusable name raises OSError."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


def _free_paths(output: Path, num_images: int, overwrite: bool, as_file: bool) -> list[Path]:
    from minidiff_cli.files.atomic import ensure_writable_dir, next_free_path

    if as_file:
        ensure_writable_dir(output.parent if str(output.parent) else Path("."))
        paths = [output] if num_images == 1 else [output.with_name(f"{output.stem}-{k}.png") for k in range(num_images)]
        for path in paths:
            if _taken(path) and not (overwrite and path.is_file()):
                raise MinidiffError(f"'{path}' already exists; choose another -o, or pass --overwrite")
        return paths
    ensure_writable_dir(output)
    paths, start = [], 0
    for _ in range(num_images):
        path = next_free_path(output, "minidiff", ".png", start)
        start = int(path.stem.rsplit("-", 1)[1]) + 1
        paths.append(path)
    return paths


def _load(model: str | None, device: str, dtype: str, from_image: Path | None):
    from minidiff_cli.errors import UnknownNameError
    from minidiff_cli.inference.pipeline import Pipeline

    try:
        if from_image is not None and model is not None:  # a name from the PNG: installed models only
            from minidiff_cli.files.models_dir import resolve_model

            model = str(resolve_model(model, installed_only=True))
        return Pipeline.load(model, device=device, dtype=dtype)
    except UnknownNameError:
        if from_image is None or model is None:
            raise
        raise MinidiffError(f"'{from_image}' was made with the model '{model}', which is not installed; "
                            "pass its file with --model FILE.safetensors") from None


def _warn_about_prompt(pipe, params: dict[str, Any]) -> None:
    from minidiff_cli.data.vocabulary import prompt_warnings

    for note in prompt_warnings(params["prompt"] or "", pipe.model.config, pipe.model.conditioner, params["model"]):
        print(f"minidiff: warning: {note}", file=sys.stderr)


def _run(pipe, gen, num_images: int, batch_size: int | None, quiet: bool, recorder=None) -> list:
    from minidiff_cli.cli.display import step_progress

    size = batch_size or min(num_images, 16)
    batches = -(-num_images // size)
    with step_progress(gen.steps_taken() * batches, f"sampling {num_images} image(s)", quiet) as advance:
        def callback(info: dict) -> None:
            advance()
            if recorder is not None:
                recorder(info)

        images = pipe.images(gen, num_images, batch_size=batch_size, callback=callback)
    return images


def _sampler_options(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings; values are read as JSON when they can be (numbers, true/false)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise MinidiffError(f"--sampler-option takes KEY=VALUE (got '{pair}')")
        try:
            options[key.strip()] = json.loads(value, parse_constant=_not_finite)
        except json.JSONDecodeError:
            options[key.strip()] = value
        except (ValueError, RecursionError):  # NaN, Infinity, too deep, too many digits
            raise MinidiffError(f"--sampler-option {key.strip()}: the value is not a usable number or "
                                "JSON value") from None
        if not _all_finite(options[key.strip()]):
            raise MinidiffError(f"--sampler-option {key.strip()}: numbers must be finite")
    return options


def _not_finite(name: str):
    raise ValueError(name)


def _all_finite(value: Any) -> bool:
    """No infinite float anywhere in a JSON value (1e999 reads as infinity)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _trajectory_paths(target: Path) -> tuple[Path, Path]:
    return target.with_name(f"{target.stem}-trajectory.png"), target.with_name(f"{target.stem}-trajectory.gif")


def _check_free(paths: list[Path]) -> None:
    for path in paths:
        if _taken(path):
            raise MinidiffError(f"'{path}' already exists; minidiff never overwrites files, choose another -o")


def _save_trajectories(recorder, targets: list[Path], overwrite: bool = False) -> list[Path]:
    from minidiff_cli.inference import trajectory

    written = []
    for k, target in enumerate(targets):
        png, gif = _trajectory_paths(target)
        trajectory.save(recorder.frames(k), png, gif, overwrite=overwrite)
        written += [png, gif]
    return written


def _save(images: list, targets: list[Path], output: Path, grid: bool, overwrite: bool = False,
          as_file: bool = False) -> list[Path]:
    from minidiff_cli.files.atomic import write_numbered
    from minidiff_cli.files.png_parameters import png_writer, save_png

    numbered = not as_file  # names minidiff chose (never replaced): claimed as each is written
    written = []
    for img, path in zip(images, targets):
        if numbered:  # another generate into the same folder may have taken this number since: take the next
            start = int(path.stem.rsplit("-", 1)[1])
            written.append(write_numbered(path.parent, "minidiff", ".png", png_writer(img, img.info["minidiff"]), start))
        else:
            written.append(save_png(img, path, img.info["minidiff"], overwrite=overwrite))
    if grid:
        from minidiff_cli.data.images import make_grid

        folder = output.parent if as_file else output
        sheet = make_grid(images)
        params = dict(images[0].info["minidiff"], grid=len(images))
        written.append(write_numbered(folder, "grid", ".png", png_writer(sheet, params)))
    return written
