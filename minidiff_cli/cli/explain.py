"""``minidiff explain``: what is inside a model, block by block, with the shapes that flow through it.

One forward pass on a dummy input (zeros of the model's image size, the null conditioning)
with a forward hook on every module records each output shape; parameter counts come from
the modules themselves. torch is imported inside the command only.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

from minidiff_cli.cli import completion
from minidiff_cli.cli.app import app
from minidiff_cli.cli.options import threads_option
from minidiff_cli.errors import MinidiffError, UnknownNameError
from minidiff_cli.runtime.threads import apply_threads


@app.command("explain")
def explain_command(
    model: Optional[str] = typer.Argument(None, autocompletion=completion.models, help="Model name or .safetensors path [default: the shipped model]."),
    depth: int = typer.Option(1, "--depth", help="How deep to open the blocks: 1 shows residual and attention "
                              "blocks, 2 also the layers inside them."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    threads: Optional[int] = threads_option(),
) -> None:
    """Show a model's U-Net as a tree (output shapes, parameters), its conditioner and its schedule.

    Examples:

      minidiff explain

      minidiff explain runs/shapes/model.safetensors --depth 2

      minidiff explain --json
    """
    apply_threads(threads)
    from minidiff_cli.diffusion.model import DiffusionModel
    from minidiff_cli.files.models_dir import resolve_model

    if depth < 1:
        raise MinidiffError(f"--depth must be at least 1 (got {depth})")
    try:
        path = resolve_model(model)
    except UnknownNameError as exc:  # its hint names --model, which this command spells as an argument
        raise UnknownNameError(str(exc).replace("pass --model FILE.safetensors", "pass one: minidiff explain "
                                                "FILE.safetensors")) from None
    loaded = DiffusionModel.load(path)
    report = explain(loaded, depth)
    report["model"] = {"file": str(path), "name": loaded.config.get("name") or path.stem, "hash": loaded.hash}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print(report)


def explain(model, depth: int = 1) -> dict[str, Any]:
    """The U-Net tree, its top-level blocks, the conditioner and the schedule of ``model``, as plain data."""
    import torch

    unet, T = model.unet, model.schedule.num_timesteps
    with torch.inference_mode():
        cond = model.conditioner.null(1)
        x = torch.zeros(1, *model.latent_shape)  # a latent model's U-Net works on latents
        t = torch.full((1,), T // 2, dtype=torch.long)
        shapes = _trace(unet, x, t, cond)
    tree = _node(unet, "unet", shapes, depth - 1)
    total = unet.num_parameters()
    return {
        "input": {"x": list(x.shape), "t": [1], "context": _shape(cond.context), "pooled": _shape(cond.pooled)},
        "unet": {"parameters": total, "config": unet.config.to_dict(), "tree": tree},
        "blocks": [{k: child[k] for k in ("name", "type", "parameters", "output_shape", "note")}
                   for child in _node(unet, "unet", shapes, 0)["children"]],
        "conditioner": _conditioner(model.conditioner, cond),
        "schedule": _schedule(model.schedule, model.config.get("schedule", {})),
        "prediction": model.prediction,
    }


# -- the forward pass -------------------------------------------------------------------
def _trace(unet, x, t, cond) -> dict:
    """{module: (call order, output shape)} for every module that ran in one forward pass."""
    seen: dict = {}

    def hook(module, args, output):
        seen[module] = (len(seen), _shape(output))  # the last call wins (none runs twice here)

    handles = [m.register_forward_hook(hook) for m in unet.modules()]
    try:
        unet(x, t, context=cond.context, pooled=cond.pooled)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _shape(value) -> list[int] | None:
    return list(value.shape) if hasattr(value, "shape") else None


def _children(module) -> list[tuple[str, Any]]:
    """Named children, with ModuleLists flattened into "down.0", "blocks.1", ...; empty Identity left out."""
    import torch.nn as nn

    out = []
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList):
            out += [(f"{name}.{i}", c) for i, c in child.named_children()]
        elif not isinstance(child, nn.Identity):
            out.append((name, child))
    return out


# Groupings that do no computation of their own: they are always opened and do not count as depth.
GROUPS = ("UNet", "Level", "Block")


def _node(module, name: str, shapes: dict, depth: int) -> dict[str, Any]:
    if type(module).__name__ in GROUPS:
        children = [_node(c, n, shapes, depth) for n, c in _children(module)]
    else:
        children = [_node(c, n, shapes, depth - 1) for n, c in _children(module)] if depth > 0 else []
    order, shape = shapes.get(module, (None, None))
    if shape is None:  # a container without forward (a Level): its output is its last child's
        ran = [shapes[m] for m in module.modules() if m in shapes]
        order, shape = max(ran, key=lambda r: r[0]) if ran else (None, None)
    node = {"name": name, "type": type(module).__name__, "parameters": sum(p.numel() for p in module.parameters()),
            "output_shape": shape, "note": _note(module, name, shapes)}
    if children:
        node["children"] = children
    return node


def _note(module, name: str, shapes: dict) -> str:
    """A few words on what the module does, for the kinds a U-Net is made of."""
    kind = type(module).__name__
    if kind == "ResBlock":
        return f"residual, {module.conv1.in_channels} -> {module.conv1.out_channels} channels, time-modulated norm"
    if kind == "Attention":
        parts = ["self-attention"] if module.self_attn else []
        if module.cross_attn:
            parts.append(f"cross-attention to the context ({module.kv.in_features}-d tokens)")
        return f"{' + '.join(parts)}, {module.heads} head{'s' if module.heads != 1 else ''}"
    if kind == "Downsample":
        return "stride-2 conv: halves H and W"
    if kind == "Upsample":
        return "nearest x2 then conv: doubles H and W"
    if kind == "Level":
        first = shapes.get(module.blocks[0], (None, None))[1] if len(module.blocks) else None
        if not first:
            return ""
        return f"level at {first[2]}x{first[3]}" + ("; each block first concatenates a skip from the way down"
                                                   if name.startswith("up") else "")
    return NOTES.get(name, "")


NOTES = {"time_mlp": "sinusoidal timestep embedding -> MLP", "pooled_proj": "pooled conditioning, added to the "
         "time embedding", "conv_in": "pixels -> feature maps", "mid1": "the bottleneck", "norm_out": "",
         "conv_out": "feature maps -> the prediction"}


def _conditioner(conditioner, cond) -> dict[str, Any]:
    config = conditioner.config()
    if isinstance(config.get("class_names"), list):  # a long class list would drown the rest
        config = {**config, "class_names": f"{len(config['class_names'])} classes"}
    return {"name": conditioner.name, "type": type(conditioner).__name__,
            "parameters": sum(p.numel() for p in conditioner.parameters()),
            "context": _shape(cond.context), "pooled": _shape(cond.pooled), "config": config}


def _schedule(schedule, stored: dict) -> dict[str, Any]:
    T = schedule.num_timesteps
    abar, log_snr = schedule.alphas_cumprod, schedule.log_snr()
    points = sorted({0, T // 2, T - 1})
    return {"name": schedule.name, "num_timesteps": T, "options": stored.get("options", {}),
            "alpha_bar": {str(t): abar[t].item() for t in points},
            "log_snr": {str(t): log_snr[t].item() for t in points}}


# -- printing ---------------------------------------------------------------------------
# What the U-Net outputs for each prediction type (model.PREDICTIONS).
OUTPUTS = {"eps": "the noise eps", "v": "v = sqrt(abar) eps - sqrt(1-abar) x0",
           "flow": "the velocity eps - x0 on the path (1 - t) x0 + t eps"}


def _print(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.tree import Tree

    console = Console()
    unet, inp = report["unet"], report["input"]
    console.print(f"model {report['model']['name']} ({report['model']['file']})", highlight=False)
    given = ", ".join(f"{k} {v}" for k, v in inp.items() if v is not None)
    console.print(f"one forward pass on zeros: {given}", highlight=False)
    tree = Tree(_label(unet["tree"]))
    _grow(tree, unet["tree"].get("children", []))
    console.print(tree)

    c = report["conditioner"]
    console.print(f"conditioner {c['name']} ({c['type']}): {c['parameters']:,} parameters; "
                  f"context {c['context']}, pooled {c['pooled']}; config {json.dumps(c['config'])}",
                  highlight=False)
    s = report["schedule"]
    abar = ", ".join(f"t={t}: {v:.4f}" for t, v in s["alpha_bar"].items())
    snr = ", ".join(f"t={t}: {v:+.2f}" for t, v in s["log_snr"].items())
    console.print(f"schedule {s['name']} over T = {s['num_timesteps']} steps; alpha_bar {abar}; log-SNR {snr}",
                  highlight=False)
    console.print(f"prediction: {report['prediction']} (the U-Net's output is "
                  f"{OUTPUTS.get(report['prediction'], report['prediction'])})", highlight=False)


def _grow(tree, children: list[dict]) -> None:
    for child in children:
        branch = tree.add(_label(child))
        _grow(branch, child.get("children", []))


def _label(node: dict):
    from rich.text import Text

    text = Text.assemble((node["name"], "bold"), " ", (node["type"], "cyan"))
    if node["output_shape"] is not None:
        text.append(f"  -> {node['output_shape']}", style="green")
    text.append(f"  {node['parameters']:,} params", style="magenta")
    if node["note"]:
        text.append(f"  {node['note']}", style="dim")
    return text
