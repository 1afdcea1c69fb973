"""The captions of an image folder (``--data DIR``), from whichever of three sources it has.

- ``metadata.jsonl`` in the folder: one JSON object a line, ``file_name`` (relative to the
  folder) and ``text`` (or ``caption``); the Hugging Face ``imagefolder`` layout.
- ``metadata.csv`` in the folder: the same as a CSV file whose header row names the columns
  ``file_name`` and ``text`` (or ``caption``); other columns are ignored, quoted fields may hold
  commas and line breaks (Hugging Face's other ``imagefolder`` layout).
- ``NAME.txt`` beside ``NAME.png`` (or .jpg, .jpeg, .webp), in any subfolder: the file's text,
  runs of whitespace (line breaks too) made one space (the kohya / ComfyUI layout).

Which wins: none does. A folder may hold one metadata file, not both (both is an error). An image
may be captioned by the metadata file, by its ``.txt``, or by both when they say the same thing
(compared with runs of whitespace as one space; the metadata's text is then used); where they
differ, or a metadata file gives one image two different captions, that is an error naming the
image and both places. A metadata caption is its text with the ends stripped.

An image without a caption gets the empty one, as it always did (unconditional and class
training, ``vae train``); where captions are what is learnt or judged (``require=True``: a
text-conditioned ``train``, ``clip train``, ``eval --data``) it is an error naming the image.

Bounds: a caption is at most MAX_CAPTION_CHARS characters from any source, a metadata line at
most MAX_LINE_CHARS; a ``file_name`` must stay inside the folder (no absolute paths, no ``..``
out of it) and name an image there; every file is UTF-8 (a leading byte-order mark is allowed).
Each failure is one ``MinidiffError`` line naming the file (and line).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from minidiff_cli.data.images import IMAGE_EXTENSIONS
from minidiff_cli.errors import MinidiffError

METADATA_JSONL = "metadata.jsonl"
METADATA_CSV = "metadata.csv"
METADATA_FILES = (METADATA_JSONL, METADATA_CSV)
MAX_CAPTION_CHARS = 10_000  # long "dense" captions run to 1,000-2,000 characters; CLIP reads 77 tokens
MAX_LINE_CHARS = 1 << 20  # one metadata line (a caption, its file name and any other fields)
TEXT_COLUMNS = ("text", "caption")  # the caption's key or column, the first present


class Caption(NamedTuple):
    text: str
    where: str  # "'DIR/metadata.jsonl' line 3", "'DIR/a.txt'": for messages


def folder_captions(root: Path, files: list[Path], *, require: bool = False) -> list[str]:
    """The caption of each of ``files`` (images under ``root``), by the rules of the module doc."""
    listed = read_metadata(root)
    captions, missing = [], []
    for path in files:
        entry, sidecar = listed.get(path.resolve()), read_sidecar(path)
        if entry is not None and sidecar is not None and _words(entry.text) != _words(sidecar.text):
            raise MinidiffError(f"two captions for '{_rel(path, root)}': {sidecar.where} says {_show(sidecar.text)} "
                                f"but {entry.where} says {_show(entry.text)}; make them agree or delete one")
        found = entry or sidecar
        if found is None:
            missing.append(path)
        captions.append(found.text if found is not None else "")
    if require and missing:
        raise MinidiffError(_missing_message(root, missing, listed_any=bool(listed) or len(missing) < len(files)))
    return captions


def read_metadata(root: Path) -> dict[Path, Caption]:
    """Captions from the folder's metadata file, by resolved image path; {} when it has none."""
    present = [name for name in METADATA_FILES if (root / name).is_file()]
    if len(present) > 1:
        raise MinidiffError(f"'{root}' holds both {METADATA_JSONL} and {METADATA_CSV}; keep one list of captions")
    if not present:
        return {}
    path = root / present[0]
    rows = _jsonl_rows(path) if present[0] == METADATA_JSONL else _csv_rows(path)
    captions: dict[Path, Caption] = {}
    for where, name, text in rows:
        image = _named_image(root, name, where, path.name)
        caption = Caption(_bounded(text.strip(), where), where)
        before = captions.get(image.resolve())
        if before is not None and before.text != caption.text:
            raise MinidiffError(f"two captions for '{name}': {before.where} says {_show(before.text)} but {where} "
                                f"says {_show(caption.text)}; keep one")
        captions.setdefault(image.resolve(), caption)
    return captions


def read_sidecar(image: Path) -> Caption | None:
    """The caption in the ``.txt`` beside ``image`` (None without one), whitespace runs made one space."""
    path = image.with_suffix(".txt")
    where = f"caption file '{path}'"
    if not path.is_file():
        if os.path.lexists(path):  # a broken link, a folder, a device or a pipe: not a caption to read
            raise MinidiffError(f"{where} is not a regular file; make it one holding the caption, or remove it")
        return None
    limit = 4 * MAX_CAPTION_CHARS + 3  # UTF-8 spends at most 4 bytes a character, the byte-order mark 3
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:  # no caption of at most MAX_CAPTION_CHARS characters takes this many bytes
        raise MinidiffError(_too_long(where))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise MinidiffError(f"{where} is not UTF-8 text") from None
    words = " ".join(text.split())
    return Caption(_bounded(words, where), where)


# -- the two metadata formats --------------------------------------------------------------
def _jsonl_rows(path: Path) -> Iterator[tuple[str, str, str]]:
    """(where, file_name, text) of each line of a metadata.jsonl."""
    with open(path, encoding="utf-8-sig", errors="strict") as fh:
        for number, line in _bounded_lines(fh, f"'{path}'"):
            if not line.strip():
                continue
            where = f"'{path}' line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MinidiffError(f"{where} is not valid JSON: {exc.msg}") from None
            except RecursionError:  # a line of 100,000 nested brackets
                raise MinidiffError(f"{where} is nested too deeply") from None
            if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
                raise MinidiffError(f"{where} has no \"file_name\"; each line needs "
                                    "{\"file_name\": ..., \"text\": ...}")
            text = next((record[k] for k in TEXT_COLUMNS if k in record), None)
            if not isinstance(text, str):
                raise MinidiffError(f"{where} has no \"text\" (the caption) as a string")
            yield where, record["file_name"], text


def _csv_rows(path: Path) -> Iterator[tuple[str, str, str]]:
    """(where, file_name, text) of each row of a metadata.csv (header row first)."""
    with open(path, encoding="utf-8-sig", errors="strict", newline="") as fh:
        lines = (line for _, line in _bounded_lines(fh, f"'{path}'"))
        reader = csv.reader(lines, strict=True)  # an unclosed quote would swallow the rows after it
        try:
            header = next(reader, None)
            if header is None:
                raise MinidiffError(f"'{path}' is empty; its first row must name the columns file_name and text")
            columns = [c.strip() for c in header]
            if "file_name" not in columns:
                raise MinidiffError(f"'{path}' has no \"file_name\" column (its header: {_show(','.join(columns))}); "
                                    "the first row must name the columns file_name and text")
            text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
            if text_column is None:
                raise MinidiffError(f"'{path}' has no \"text\" column (its header: {_show(','.join(columns))}); "
                                    "the first row must name the columns file_name and text")
            name_at, text_at = columns.index("file_name"), columns.index(text_column)
            for row in reader:
                where = f"'{path}' line {reader.line_num}"
                if not row or not any(cell.strip() for cell in row):
                    continue
                if len(row) <= max(name_at, text_at):
                    raise MinidiffError(f"{where} has {len(row)} field(s); the header names {len(columns)}")
                yield where, row[name_at], row[text_at]
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):  # csv's own bound (131,072), past ours
                raise MinidiffError(_too_long(f"'{path}' line {reader.line_num}")) from None
            raise MinidiffError(f"'{path}' line {reader.line_num} is not valid CSV: {exc}") from None


def _bounded_lines(fh, where: str) -> Iterator[tuple[int, str]]:
    """(number, line) of a text file: at most MAX_LINE_CHARS a line; bytes that are not UTF-8 are one
    line naming the file."""
    number = 0
    try:
        while True:
            line = fh.readline(MAX_LINE_CHARS + 1)
            if not line:
                return
            number += 1
            if len(line) > MAX_LINE_CHARS:
                raise MinidiffError(f"{where} line {number} is longer than {MAX_LINE_CHARS:,} characters")
            yield number, line
    except UnicodeDecodeError as exc:
        raise MinidiffError(f"{where} is not UTF-8 text (byte {exc.start} of a block: {exc.reason})") from None


# -- checks ----------------------------------------------------------------------------------
def _named_image(root: Path, name: str, where: str, listing: str) -> Path:
    """The image a metadata ``file_name`` names: relative, inside ``root``, an existing image file."""
    shown = _show(name, 200, quote="'")
    if not name.strip() or "\0" in name:
        raise MinidiffError(f"{where} has an empty or unreadable \"file_name\" {shown}")
    if Path(name).is_absolute() or name.startswith(("/", "\\")):
        raise MinidiffError(f"{where} names {shown}, an absolute path; file_name is relative to '{root}'")
    normal = os.path.normpath(name)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise MinidiffError(f"{where} names {shown}, which is outside '{root}'; {listing} lists the folder's "
                            "own images")
    image = root / normal
    if not image.is_file():
        raise MinidiffError(f"{where} names {shown}, which is not in '{root}'")
    if image.suffix.lower() not in IMAGE_EXTENSIONS:
        raise MinidiffError(f"{where} names {shown}, which is not an image ({', '.join(IMAGE_EXTENSIONS)})")
    return image


def _bounded(text: str, where: str) -> str:
    if len(text) > MAX_CAPTION_CHARS:
        raise MinidiffError(_too_long(where))
    return text


def _too_long(where: str) -> str:
    return f"{where} holds a caption longer than {MAX_CAPTION_CHARS:,} characters; shorten it"


def _missing_message(root: Path, missing: list[Path], listed_any: bool) -> str:
    first = _rel(missing[0], root)
    others = f" (and {len(missing) - 1} other image(s))" if len(missing) > 1 else ""
    if not listed_any:
        return (f"'{root}' has no captions, and this command learns or judges captions: add a {METADATA_JSONL} "
                f"or {METADATA_CSV} (file_name, text), or a .txt beside each image")
    return (f"image '{first}'{others} in '{root}' has no caption; add a line for it to the folder's "
            f"{METADATA_JSONL} or {METADATA_CSV}, or its caption in '{Path(first).with_suffix('.txt')}'")


def _words(text: str) -> str:
    return " ".join(text.split())


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _show(text: str, limit: int = 60, quote: str = '"') -> str:
    """A caption or name for a one-line message: quoted, control characters escaped, cut."""
    inner = json.dumps(text[:limit], ensure_ascii=False)[1:-1]
    return f"{quote}{inner}{'...' if len(text) > limit else ''}{quote}"
