"""The `eval --data` report as printed: counts that hold for the folder, no negative zero."""

from __future__ import annotations

import torch

from minidiff_cli.evaluation.caption_eval import describe
from minidiff_cli.evaluation.distribution import frechet_distance


def metrics(**more) -> dict:
    return {"clip_score": 30.0, "r_precision": 0.5, "fd_clip": 0.0, "kid_clip": 0.0, "precision": None,
            "recall": None, **more}


def report(**more) -> dict:
    return {"images": 20, "captions": 20, "heldout_captions": 0, "sampler": "ddim", "steps": 10, "cfg": 3.0,
            "reference_images": 20, "r_precision_candidates": 20, "generated": metrics(),
            "real": metrics(), **more}


def test_r_precision_says_among_how_many_captions():
    lines = describe(report())
    assert any(line.startswith("R-precision (of 20)") for line in lines), lines
    assert not any("of 100" in line for line in lines)


def test_a_distance_of_rounding_error_prints_as_zero_not_minus_zero():
    lines = describe(report(generated=metrics(fd_clip=-0.0), real=metrics(fd_clip=-0.0)))
    fd = next(line for line in lines if line.startswith("Frechet"))
    assert "-0" not in fd and fd.split()[-2:] == ["0", "0"], fd


def test_the_frechet_distance_of_a_set_with_itself_is_never_negative():
    features = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(features, features) >= 0.0
