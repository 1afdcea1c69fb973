"""Hostile model files made in a test: the broken safetensors files that every reader of model files and
checkpoints must refuse in one line (used by test_model_file.py, test_checkpoint.py and test_clip_config.py)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file
from tinymodels import tiny_model

from minidiff_cli.files.model_file import FORMAT_VERSION


def raw(data: bytes):
    def make(folder: Path) -> Path:
        path = folder / "bad.safetensors"
        path.write_bytes(data)
        return path
    return make


def safetensors_with(metadata: dict[str, str], tensors: dict | None = None):
    def make(folder: Path) -> Path:
        path = folder / "bad.safetensors"
        save_file(tensors or {"weight": torch.zeros(2, 2)}, str(path), metadata=metadata)
        return path
    return make


def truncated_copy(folder: Path) -> Path:
    good = tiny_model("class", seed=2).save(folder / "good.safetensors")
    path = folder / "bad.safetensors"
    path.write_bytes(good.read_bytes()[:-700])
    return path


def future_model(folder: Path) -> Path:
    model = tiny_model("class")
    path = folder / "bad.safetensors"
    meta = {"format": "minidiff", "format_version": str(FORMAT_VERSION + 1), "config": "{}"}
    save_file({k: v.contiguous() for k, v in model.tensors().items()}, str(path), metadata=meta)
    return path


def negative_shape(folder: Path) -> Path:
    header = json.dumps({"w": {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}}).encode()
    return raw(struct.pack("<Q", len(header)) + header + b"\0" * 4)(folder)


HOSTILE_MODELS = [
    ("random-bytes", raw(bytes(range(256)) * 16), "truncated or not a safetensors file"),
    ("three-bytes", raw(b"\x01\x02\x03"), "not a safetensors file (only 3 bytes)"),
    ("truncated", truncated_copy, "truncated"),
    ("header-larger-than-file", raw(struct.pack("<Q", 10_000) + b"{}"), "header says 10000 bytes, file has 10"),
    ("header-not-json", raw(struct.pack("<Q", 8) + b"\xff\xfenot{" + b"\0" * 16), "header is not JSON"),
    ("header-nested-too-deep", raw(struct.pack("<Q", 100_000) + b"[" * 100_000), "header is not JSON"),
    ("negative-shape", negative_shape, "does not fit the file"),
    ("foreign-safetensors", safetensors_with({"format": "pt"}), "not a minidiff model"),
    ("no-metadata", safetensors_with({}), "not a minidiff model"),
    ("future-version", future_model, f"format version {FORMAT_VERSION + 1}, newer than this minidiff"),
    ("version-zero", safetensors_with({"format": "minidiff", "format_version": "0", "config": "{}"}),
     "unreadable format version"),
    ("config-not-json", safetensors_with({"format": "minidiff", "format_version": "1", "config": "[[[" * 9000}),
     "config is missing or not JSON"),
]


def header_only_model(path: Path, config: dict) -> Path:
    """A model file of a few hundred bytes: a config and no tensors (it claims whatever it likes)."""
    save_file({}, str(path), metadata={"format": "minidiff", "format_version": "1", "config": json.dumps(config)})
    return path
