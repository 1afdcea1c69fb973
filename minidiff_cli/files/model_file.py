"""The model file: one safetensors file with every tensor and a JSON config.

Layout::

    tensors   "unet.<param>"         the U-Net's weights
              "conditioner.<param>"  the conditioner's weights (if it has any)
    metadata  "format"          = "minidiff"
              "format_version"  = "1"
              "config"          = JSON: unet, schedule, conditioner, image size,
                                  prediction type, class names, training summary

Files from strangers are hostile until proven otherwise, so the header is read
and checked by hand before safetensors maps any tensor: a truncated file, a
header larger than the file, a header that is not JSON, another program's
safetensors file, or a format version from the future is refused with one line
that names the file. Nothing here can execute code: safetensors has no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minidiff_cli.errors import ModelFileError, is_count
from minidiff_cli.files.atomic import atomic_write

FORMAT = "minidiff"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class ModelFile:
    """A validated model file: its config, its tensors, and a short content hash."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, Any]
    hash: str

    def section(self, prefix: str) -> dict[str, Any]:
        """The tensors under ``prefix.``, with the prefix removed."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, dict]]:
    """Check a safetensors file's framing and return (metadata, tensor entries)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file '{path}' does not exist")
    if not path.is_file():
        raise ModelFileError(f"'{path}' is not a file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelFileError(f"'{path}' is not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise ModelFileError(f"'{path}' is truncated or not a safetensors file "
                                 f"(header says {header_len} bytes, file has {size})")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # not UTF-8 or not JSON, nested too deep, a 4300-digit number
        raise ModelFileError(f"'{path}' is corrupt: its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"'{path}' is corrupt: its safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelFileError(f"'{path}' is corrupt: its metadata is not a JSON object")
    _check_extents(path, header, size - 8 - header_len)
    return metadata, header


def _check_extents(path: Path, entries: dict[str, Any], data_size: int) -> None:
    """Every tensor must lie inside the file and match its own shape and dtype."""
    for name, entry in entries.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = 1
            for dim in shape:
                if not is_count(dim):
                    raise ValueError(dim)
                count *= dim
            ok = (is_count(start) and is_count(end) and start <= end <= data_size
                  and (end - start) == count * DTYPE_BYTES[dtype])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelFileError(f"'{path}' is truncated or corrupt: tensor '{name}' does not fit the file")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of a minidiff model file, after checking format and version."""
    return read_model_header(path)[0]


def read_model_header(path: str | os.PathLike, format: str = FORMAT,
                      kind: str = "minidiff model") -> tuple[dict[str, Any], dict[str, dict]]:
    """(config, tensor entries) of a minidiff model file (or of another ``format``, such as a VAE
    file), after checking format and version; no tensor data is read."""
    path = Path(path)
    metadata, entries = read_header(path)
    if metadata.get("format") != format:
        found = metadata.get("format")
        hint = f"; it is a '{found!s:.40}' file" if isinstance(found, str) and found.startswith("minidiff") else ""
        raise ModelFileError(f"'{path}' is a safetensors file but not a {kind} "
                             f"(no 'format: {format}' in its metadata{hint})")
    try:
        version = int(metadata.get("format_version", ""))
    except (TypeError, ValueError):  # ValueError: not a number, or one of 4300+ digits
        raise ModelFileError(f"'{path}' has an unreadable format version") from None
    if version < 1:
        raise ModelFileError(f"'{path}' has an unreadable format version ({version})")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"'{path}' has format version {version}, newer than this minidiff "
                             f"understands ({FORMAT_VERSION}); upgrade minidiff")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, TypeError, ValueError, RecursionError):
        raise ModelFileError(f"'{path}' is corrupt: its config is missing or not JSON") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"'{path}' is corrupt: its config is not a JSON object")
    return config, entries


def load_model_file(path: str | os.PathLike) -> ModelFile:
    """Read and check a model file; the tensors are loaded on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config = read_config(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"'{path}' could not be read: {exc}") from None
    return ModelFile(path=path, config=config, tensors=tensors, hash=file_hash(path))


def load_finite_tensors(path: Path) -> dict[str, Any]:
    """Every tensor of a (checked) safetensors file, on the CPU; an unreadable file or a NaN or
    infinite value is a one-line ModelFileError naming the file and the tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from minidiff_cli.errors import first_line

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"'{path}' is corrupt: {first_line(exc) or type(exc).__name__}") from None
    check_finite(path, tensors)
    return tensors


def check_finite(path: Path, tensors: dict[str, Any]) -> None:
    """A NaN or infinite value in a floating-point tensor is a one-line ModelFileError naming it."""
    for key, value in tensors.items():
        if value.is_floating_point() and not value.isfinite().all():
            raise ModelFileError(f"'{path}' is corrupt: {key} holds NaN or infinite values")


def save_model_file(path: str | os.PathLike, tensors: dict[str, Any], config: dict[str, Any],
                    *, overwrite: bool = False, format: str = FORMAT) -> Path:
    """Write tensors and config atomically (a crash never leaves half a file)."""
    from safetensors.torch import save_file

    metadata = {"format": format, "format_version": str(FORMAT_VERSION), "config": json.dumps(config)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite=overwrite)


def file_hash(path: str | os.PathLike) -> str:
    """The first 10 hex digits of the file's SHA-256, as image metadata records it."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


# torch's dtype names -> safetensors' (keyed by name so that reading a header needs no torch)
DTYPE_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
               "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def check_entries(where: str, expected: dict[str, Any], entries: dict[str, dict]) -> None:
    """The file's header lists exactly the tensors the config implies, with their shapes and dtypes."""
    missing = sorted(set(expected) - set(entries))
    extra = sorted(set(entries) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise ModelFileError(f"{where} does not match its config: {what} "
                             f"({len(missing)} missing, {len(extra)} unexpected tensors)")
    for key, ref in expected.items():
        shape, dtype = tuple(entries[key]["shape"]), entries[key]["dtype"]
        if shape != tuple(ref.shape):
            raise ModelFileError(f"{where} does not match its config: {key} has shape {shape}, "
                                 f"expected {tuple(ref.shape)}")
        want = DTYPE_NAMES.get(str(ref.dtype).removeprefix("torch."), str(ref.dtype))
        if dtype != want:
            raise ModelFileError(f"{where} does not match its config: {key} is stored as {dtype}, expected {want}")
