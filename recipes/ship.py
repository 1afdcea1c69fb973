"""Copy a finished run into the package as a shipped model (what was done for the emoji model).

    python recipes/ship.py runs/emoji emoji

writes minidiff_cli/models/NAME.safetensors (the run's EMA model, its U-Net stored in float16:
half the bytes, float32 again once loaded) and, when the run trained its own CLIP (stage 1 of
`train --conditioner clip`), minidiff_cli/models/clip/NAME.safetensors: the CLIP with its image
tower, which `minidiff eval --model NAME --data DIR` judges the model with; --judge FILE ships
another CLIP as the judge instead (one trained at the resolution the model draws, say).
--description replaces the model card's description. Existing files are replaced only with
--overwrite. A distilled student (`minidiff distill`) ships as it is, its adapter alone, renamed:

    python recipes/ship.py runs/shapes-fast shapes-fast [--steps 4]
"""

import argparse
import shutil
from pathlib import Path

from safetensors.torch import load_file

from minidiff_cli.diffusion.model import DiffusionModel
from minidiff_cli.files.model_file import read_config, save_model_file

MODELS = Path(__file__).resolve().parents[1] / "minidiff_cli" / "models"

parser = argparse.ArgumentParser(description="Ship a run's model in the package.")
parser.add_argument("run", type=Path, help="the run folder (holds model.safetensors)")
parser.add_argument("name", help="the shipped model's name (--model NAME)")
parser.add_argument("--judge", type=Path, help="the CLIP (with its image tower) to ship as the judge")
parser.add_argument("--description", help="the model card's description")
parser.add_argument("--steps", type=int, help="a student's default sampling steps (what generate uses)")
parser.add_argument("--overwrite", action="store_true")
args = parser.parse_args()

source = args.run / "model.safetensors"
config = read_config(source)
if "student" in config:  # the adapter file itself, under its new name; its teacher ships already
    config["name"] = args.name
    if args.description:
        config.setdefault("card", {})["description"] = args.description
    if args.steps:
        config["sampling"]["steps"] = args.steps
    DiffusionModel.check_file(source)
    out = save_model_file(MODELS / f"{args.name}.safetensors", load_file(str(source)), config,
                          overwrite=args.overwrite)
    raise SystemExit(print(f"{out}: {out.stat().st_size / 1e6:.2f} MB, a student of '{config['student']['teacher']['name']}'"))
model = DiffusionModel.load(source)
model.config["name"] = args.name
if args.description:
    model.config.setdefault("card", {})["description"] = args.description
out = model.save(MODELS / f"{args.name}.safetensors", overwrite=args.overwrite, unet_dtype="float16")
print(f"{out}: {out.stat().st_size / 1e6:.1f} MB")
clip = args.judge or args.run / "clip.safetensors"
if clip.is_file():
    target = MODELS / "clip" / f"{args.name}.safetensors"
    if target.exists() and not args.overwrite:
        raise SystemExit(f"{target} exists; pass --overwrite")
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(clip, target)
    print(f"{target}: {target.stat().st_size / 1e6:.1f} MB")
