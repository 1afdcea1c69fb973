"""open_clip's tokenizer, loaded from open_clip's folder without the package ``__init__``.

``import open_clip`` imports its whole model zoo (torchvision, timm, torch._dynamo among
them): seconds that ``minidiff generate`` would pay for a tokenizer. Its tokenizer module
with its vocabulary file needs only ftfy, regex, numpy and torch, so it is loaded alone.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=8)
def _tokenizer(context_length: int, options: tuple = ()):
    module = tokenizer_module()
    default = getattr(module, "_tokenizer", None)  # the one open_clip.tokenize uses, built on import
    if not options and isinstance(default, module.SimpleTokenizer):
        # Share its vocabulary tables rather than parse the BPE file again (0.2 s).
        tokenizer = copy.copy(default)
        tokenizer.context_length = context_length
        return tokenizer
    return module.SimpleTokenizer(context_length=context_length, **dict(options))


OPEN_CLIP_TOKENIZER = "minidiff_cli._open_clip_tokenizer"  # open_clip/tokenizer.py, loaded on its own


@functools.lru_cache(maxsize=1)
def tokenizer_module():
    """open_clip's ``tokenizer`` module, without running open_clip's package ``__init__``.

    ``open_clip/tokenizer.py`` imports ftfy, regex, numpy and torch only, and finds its
    vocabulary file next to itself, so it is executed from its file under a private name:
    0.2 s instead of the 3 s or more of ``import open_clip``. Where open_clip is imported
    already, or its file cannot be loaded alone (a future open_clip whose tokenizer
    imports its siblings), open_clip's own module is used.
    """
    if "open_clip" in sys.modules:
        return importlib.import_module("open_clip.tokenizer")
    spec = importlib.util.find_spec("open_clip")  # finds the package folder; imports nothing
    folders = spec.submodule_search_locations if spec is not None else None
    path = Path(folders[0]) / "tokenizer.py" if folders else None
    if path is None or not path.is_file():
        return importlib.import_module("open_clip.tokenizer")
    module_spec = importlib.util.spec_from_file_location(OPEN_CLIP_TOKENIZER, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError:  # it wants a sibling module: let the package load it
        return importlib.import_module("open_clip.tokenizer")
    return module


def tokenizer_for(text_cfg: dict[str, Any]):
    """open_clip's BPE tokenizer (its vocabulary ships with the package), padded to the context length."""
    options = tuple(sorted((text_cfg.get("tokenizer_kwargs") or {}).items()))
    return _tokenizer(int(text_cfg.get("context_length", 77)), options)
