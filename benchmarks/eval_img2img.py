"""How far does image-to-image change a picture, strength by strength? Measured on a set of pictures.

The README says what `--strength` does to a picture; this measures it on many pictures rather than
one. Each source picture is a shape drawn by the shapes data set's renderer (its own colour, shape,
size, place and background); the prompt asks for the same shape in another colour. For every
strength, each picture is redrawn with several seeds, and the geometric judge
(``evaluation.shape_classifier``) names what came out:

- "colour": the asked colour was drawn;
- "colour+shape": the asked colour, and the source's shape kept (what a user of img2img wants);
- "kept layout": the mean absolute pixel change from the source, of 255 (lower keeps more).

    python benchmarks/eval_img2img.py [--model shapes-clip] [--pictures 12] [--seeds 4] [--steps 20]

Prints one table (markdown) to paste into benchmarks/RESULTS.md; runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from minidiff_cli import Pipeline
from minidiff_cli.data.shapes import ShapesDataset, draw
from minidiff_cli.evaluation.shape_classifier import classify

STRENGTHS = (0.3, 0.5, 0.6, 0.7, 0.8, 1.0)


def sources(count: int, size: int, seed: int) -> list[tuple[object, str, str]]:
    """(picture, its colour, its shape) for ``count`` items of the shapes data set."""
    data = ShapesDataset(size, seed=seed)
    out = []
    for index in range(count):
        spec = data.spec(index)
        out.append((draw(spec, size), spec.colour, spec.shape))
    return out


def other_colour(colour: str, colours: list[str], rng: random.Random) -> str:
    return rng.choice([c for c in colours if c != colour])


def measure(pipe: Pipeline, pictures, strengths, seeds: int, steps: int, cfg: float) -> dict[float, dict[str, float]]:
    rng = random.Random(0)
    colours = list(ShapesDataset(8).colours)
    targets = [other_colour(colour, colours, rng) for _, colour, _ in pictures]
    table = {}
    for strength in strengths:
        colour_hits = both_hits = 0
        change = []
        for (picture, _, shape), target in zip(pictures, targets):
            images = pipe.generate(f"a {target} {shape}", steps=steps, cfg=cfg, sampler="ddim", seed=0,
                                   num_images=seeds, init_image=picture, strength=strength)
            source = np.asarray(picture.convert("RGB")).astype(int)
            for image in images:
                got_colour, got_shape = classify(image)
                colour_hits += got_colour == target
                both_hits += got_colour == target and got_shape == shape
                change.append(np.abs(np.asarray(image).astype(int) - source).mean())
        n = len(pictures) * seeds
        table[strength] = {"colour": colour_hits / n, "both": both_hits / n, "change": float(np.mean(change)),
                           "change_sd": float(np.std(change)), "n": n}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-clip")
    parser.add_argument("--pictures", type=int, default=12, help="source pictures from the shapes renderer")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per picture and strength")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--data-seed", type=int, default=12345, help="which pictures: the renderer's seed")
    args = parser.parse_args()

    pipe = Pipeline.load(args.model)
    pictures = sources(args.pictures, pipe.model.image_size, args.data_seed)
    start = time.perf_counter()
    table = measure(pipe, pictures, STRENGTHS, args.seeds, args.steps, args.cfg)
    seconds = time.perf_counter() - start
    print(f"{args.model}, DDIM {args.steps}, cfg {args.cfg}; {args.pictures} pictures (shapes renderer seed "
          f"{args.data_seed}) x {args.seeds} seeds; prompt: the same shape in another colour; {seconds:.0f} s\n")
    print("| strength | asked colour | asked colour, shape kept | mean pixel change (sd) |")
    print("|---|---|---|---|")
    for strength, row in table.items():
        print(f"| {strength:g} | {row['colour']:.3f} | {row['both']:.3f} | {row['change']:.1f} ({row['change_sd']:.1f}) |")


if __name__ == "__main__":
    main()
