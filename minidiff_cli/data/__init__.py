"""Data sets: the contract plugins follow, the built-in sources, holdouts and pictures.

    dataset.py      the data set contract (check_dataset), caption_set, EpochShuffle
    sources.py      ``--data NAME|DIR``: open_dataset, the one way every command reads data
    holdout.py      ``--holdout``: colour-shape pairs, or a hashed share of captions
    image_folder.py a folder of pictures with captions (see captions.py) or class subfolders
    captions.py     a folder's captions: metadata.jsonl, metadata.csv, .txt beside each image
    shapes.py       the procedural shapes world (coloured shapes with captions)
    images.py       picture conversions (RGB, square, tensors in [-1, 1]) and grids
    vocabulary.py   the words of a data set's captions, for prompt warnings

May import: plugins (to find registered data sets), errors.
``check_dataset`` and ``caption_set`` are also reachable as ``minidiff_cli.data.check_dataset``,
the path the plugin guide gave before the regrouping.
"""


def __getattr__(name):
    if name in ("check_dataset", "caption_set", "EpochShuffle"):  # the contract's names, without importing torch
        import importlib

        return getattr(importlib.import_module("minidiff_cli.data.dataset"), name)
    raise AttributeError(f"module 'minidiff_cli.data' has no attribute {name!r}")
