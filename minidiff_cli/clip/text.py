"""The ``clip`` conditioner: a frozen open_clip text encoder.

For a prompt the encoder gives (Radford et al. 2021, Sec. 2.4):

- ``context`` [B, L, width]: every token's hidden state after the final
  LayerNorm, for the U-Net's cross-attention (as in Rombach et al. 2022);
- ``pooled`` [B, embed_dim]: the end-of-text token's state through the text
  projection, the vector CLIP compares with images.

The null conditioning is the encoding of the empty prompt "".

The module keeps open_clip's parameter names (``token_embedding``,
``positional_embedding``, ``transformer.*``, ``ln_final``, ``text_projection``:
the text parts of ``open_clip.CLIP``), so open_clip checkpoints load as they
are. Its config is ``{"embed_dim", "text_cfg", "quick_gelu"}``, the matching
parts of an open_clip model config.

Cold start. ``import open_clip`` (or of any of its submodules, since that runs the
package's ``__init__``) imports its whole model zoo, torchvision, timm and
torch._dynamo among them: seconds that ``minidiff generate`` would pay for a
tokenizer and a small transformer. So, for the text towers open_clip's default
``TextTransformer`` builds (those of nearly all open_clip models, and of every
``minidiff clip train`` file), this module lays the same torch.nn modules out
under the same names itself (``TextTower``; a test
checks names, shapes and outputs against open_clip's), and it loads open_clip's
tokenizer module, with its vocabulary file, from open_clip's folder without the
package ``__init__`` (it imports only ftfy, regex, numpy and torch). Other text
towers (open_clip's custom attention blocks) are built by open_clip itself.

Weights come from safetensors files only. A pickle (``torch.save``'s ``.pt`` or
``.bin``) can run code when loaded, so minidiff refuses it rather than unpickling.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
import math
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from minidiff_cli.clip.config import CUSTOM_BLOCK_KEYS, POOL_TYPES, TOKENIZER_VOCAB, check_clip_config
from minidiff_cli.diffusion.conditioning import Conditioning, module_device
from minidiff_cli.errors import MinidiffError, ModelFileError

# The file `minidiff clip train` writes: an open_clip CLIP state dict in safetensors.
FORMAT = "minidiff-clip"
FORMAT_VERSION = 1

TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
DEFAULT_CACHE_SIZE = 256


# -- reading weight files ----------------------------------------------------------
def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; a pickle is refused, never loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from minidiff_cli.files.model_file import read_header

    path = Path(path)
    if not path.is_file():
        raise MinidiffError(f"weights file '{path}' does not exist" if not path.exists()
                            else f"'{path}' is not a file")
    try:
        metadata, _ = read_header(path)  # reads the JSON header only: safe on any file
    except ModelFileError:
        with open(path, "rb") as fh:
            head = fh.read(2)
        # torch.save writes a zip archive ("PK"); the legacy format starts with pickle's PROTO opcode.
        if head == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise ModelFileError(f"'{path}' is a PyTorch pickle file, not safetensors; minidiff never unpickles "
                                 "files (loading a pickle can run code): convert it to .safetensors first") from None
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelFileError(f"'{path}' is not a safetensors file; {path.suffix} files are usually pickles, "
                                 "which minidiff never loads: convert it to .safetensors first") from None
        raise
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"'{path}' could not be read: {exc}") from None
    return metadata, tensors


def text_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text-encoder tensors of an open_clip checkpoint, under the names this module uses.

    Accepts a whole CLIP (text parts at the top, ``visual.*`` ignored), a
    ``CustomTextCLIP`` (text parts under ``text.``) and DDP's ``module.`` prefix.
    """
    out = {}
    for key, value in tensors.items():
        key = key.removeprefix("module.")
        key = key.removeprefix("text.")
        if key.startswith(TEXT_KEYS):
            out[key] = value
    return out


def read_clip_config(metadata: dict[str, str], path: Path) -> Optional[dict[str, Any]]:
    """The text-encoder config stored in a file's metadata, or None if it has none."""
    fmt = metadata.get("format")
    try:
        if fmt == FORMAT:
            if int(metadata.get("format_version", "0")) > FORMAT_VERSION:
                raise ModelFileError(f"'{path}' is a newer minidiff-clip file than this minidiff reads; "
                                     "upgrade minidiff")
            config = json.loads(metadata["config"])
            return {k: config[k] for k in ("embed_dim", "text_cfg", "quick_gelu") if k in config}
        if fmt == "minidiff":  # a diffusion model file: reuse its clip conditioner
            conditioner = json.loads(metadata["config"]).get("conditioner", {})
            if conditioner.get("name") == "clip":
                return conditioner["config"]
    except (KeyError, TypeError, ValueError):
        raise ModelFileError(f"'{path}' has a missing or unreadable config in its metadata") from None
    return None


# -- open_clip configs and pretrained weights --------------------------------------
HF_HUB_PREFIX = "hf-hub:"


def arch_config(arch: str, pretrained_tag: Optional[str] = None) -> dict[str, Any]:
    """The text-encoder config of open_clip architecture ``arch`` (e.g. ``ViT-B-32``).

    ``hf-hub:ORG/NAME`` reads ``open_clip_config.json`` from the Hugging Face cache.
    """
    import open_clip

    if arch.startswith(HF_HUB_PREFIX):
        path = _hf_cached(arch[len(HF_HUB_PREFIX):], ["open_clip_config.json"])
        if path is None:
            raise not_cached(arch)
        try:
            model_cfg = json.loads(path.read_text()).get("model_cfg")
        except (OSError, ValueError, AttributeError):
            model_cfg = None
        if not isinstance(model_cfg, dict):
            raise MinidiffError(f"the cached open_clip_config.json of '{arch}' has no model_cfg")
    else:
        model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise MinidiffError(f"open_clip has no architecture '{arch}'; e.g. ViT-B-32, RN50, ViT-B-16 "
                            "(see open_clip.list_models())")
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    if pretrained_tag:  # e.g. OpenAI's weights were trained with QuickGELU
        quick_gelu = quick_gelu or bool(open_clip.get_pretrained_cfg(arch, pretrained_tag).get("quick_gelu"))
    return {"embed_dim": model_cfg["embed_dim"], "text_cfg": dict(model_cfg["text_cfg"]), "quick_gelu": quick_gelu}


def cached_pretrained_file(arch: str, tag: str) -> Path:
    """The local file of open_clip's pretrained ``tag`` for ``arch``, if it is in the HF cache.

    Never downloads: offline, open_clip's own download retries for most of a
    minute before failing, so look in the cache and fail at once instead.
    """
    import open_clip
    from open_clip.constants import HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        more = f" and {len(tags) - 6} more" if len(tags) > 6 else ""
        known = f"its tags: {', '.join(tags[:6])}{more}" if tags else "it has no pretrained tags"
        raise MinidiffError(f"open_clip has no pretrained weights '{tag}' for '{arch}'; {known} "
                            "(or pass a local .safetensors file)")
    if cfg.get("file"):
        return Path(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        found = _hf_cached(repo_id, _weight_names(filename or HF_WEIGHTS_NAME))
        if found is not None:
            return found
    raise not_cached(arch, tag)


def hub_weights_file(arch: str) -> Path:
    """The cached weights of an ``hf-hub:ORG/NAME`` architecture (its repo holds config and weights)."""
    from open_clip.constants import HF_WEIGHTS_NAME

    found = _hf_cached(arch[len(HF_HUB_PREFIX):], _weight_names(HF_WEIGHTS_NAME))
    if found is None:
        raise not_cached(arch)
    return found


def not_cached(arch: str, tag: Optional[str] = None) -> MinidiffError:
    what = f"pretrained weights '{tag}' for '{arch}' are" if tag else f"'{arch}' is"
    return MinidiffError(f"{what} not cached and cannot be downloaded here; "
                         "pass a local weights file with --clip-weights")


def _weight_names(filename: str) -> list[str]:
    """The safetensors twin of a checkpoint name first (open_clip's hub repos often hold both)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    stem = os.path.splitext(filename)[0]
    twin = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else stem + ".safetensors"
    return list(dict.fromkeys([twin, filename]))


def _hf_cached(repo_id: str, names: list[str]) -> Optional[Path]:
    """The first of ``names`` in the local Hugging Face cache of ``repo_id``; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        try:
            found = try_to_load_from_cache(repo_id, name)
        except ValueError:  # not a valid repo id or file name
            return None
        if isinstance(found, str):
            return Path(found)
    return None


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


# -- the conditioner ---------------------------------------------------------------
class ClipTextConditioner(nn.Module):
    """A frozen open_clip text transformer: ``context`` [B, L, width], ``pooled`` [B, embed_dim]."""

    name = "clip"
    trainable = False
    storage_dtype = "float16"  # the token embedding alone is 49408 x width

    def __init__(self, config: dict[str, Any], cache_size: int = DEFAULT_CACHE_SIZE):
        super().__init__()
        checked = check_clip_config(config)  # allow-listed and bounded before anything is built
        embed_dim, text_cfg, quick_gelu = checked["embed_dim"], checked["text_cfg"], checked["quick_gelu"]
        tower = build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)
        self._config = {"embed_dim": embed_dim, "text_cfg": text_cfg, "quick_gelu": quick_gelu}

        # The text parts of open_clip.CLIP, under the same names, so its checkpoints load as they are.
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.pool_type, self.eos_id = tower.pool_type, tower.eos_id

        self.context_length = tower.context_length
        self.context_dim = tower.width
        self.pooled_dim = tower.output_dim if tower.text_projection is not None else tower.width
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.register_load_state_dict_post_hook(lambda module, keys: module._cache.clear())
        self.requires_grad_(False)
        self.eval()

    # -- frozen ---------------------------------------------------------------
    def train(self, mode: bool = True) -> "ClipTextConditioner":
        """Always in eval mode: the encoder is frozen, even while the U-Net trains."""
        return super().train(False)

    def _apply(self, *args: Any, **kwargs: Any):
        self._cache.clear()  # .to(), .half() etc.: cached rows would be on the old device/dtype
        return super()._apply(*args, **kwargs)

    # -- encoding -------------------------------------------------------------
    @property
    def tokenizer(self):
        return tokenizer_for(self._config["text_cfg"])

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, context_length]: start, BPE tokens, end, zero padding (long prompts are cut)."""
        return self.tokenizer(list(prompts))

    def cut_words(self, prompt: str) -> str:
        """The end of ``prompt`` that does not fit the context (start and end tokens take two); "" if it fits."""
        tokenizer = self.tokenizer
        ids = tokenizer.encode(prompt)
        room = self.context_length - 2
        return tokenizer.decode(ids[room:]).strip() if len(ids) > room else ""

    def encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states after ln_final [B, L, width], projected end-of-text state [B, embed_dim])."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        pooled = _pool(x, tokens, self.pool_type, self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection
        return x, pooled

    def encode(self, prompts: list[str]) -> Conditioning:
        prompts = [str(p) for p in prompts]
        device = module_device(self)
        # Outside inference mode, so that cached rows can be used later by training code too.
        with torch.inference_mode(False), torch.no_grad():
            rows = self._rows(prompts, device)
            if not rows:
                dtype = self.positional_embedding.dtype
                return Conditioning(torch.zeros(0, self.context_length, self.context_dim, device=device, dtype=dtype),
                                    torch.zeros(0, self.pooled_dim, device=device, dtype=dtype))
            return Conditioning(torch.stack([c for c, _ in rows]), torch.stack([p for _, p in rows]))

    def _rows(self, prompts: list[str], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.cache_size <= 0:
            context, pooled = self.encode_tokens(self.tokenize(prompts).to(device))
            return list(zip(context, pooled))
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        fresh = {}
        if new:
            context, pooled = self.encode_tokens(self.tokenize(new).to(device))
            fresh = {p: (c, v) for p, c, v in zip(new, context, pooled)}
        rows = [fresh[p] if p in fresh else self._cache[p] for p in prompts]
        for p in dict.fromkeys(prompts):  # most recently used last
            self._cache[p] = fresh.get(p) or self._cache[p]
            self._cache.move_to_end(p)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return rows

    def null(self, batch: int) -> Conditioning:
        """The encoding of the empty prompt, ``batch`` times."""
        return self.encode([""]).repeat_interleave(batch)

    # -- building -------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._config))  # a deep, JSON-safe copy

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ClipTextConditioner":
        return cls(config)

    @classmethod
    def from_options(cls, weights: Optional[str] = None, arch: Optional[str] = None,
                     pretrained: Optional[str] = None, config: Optional[dict | str] = None,
                     cache_size: int = DEFAULT_CACHE_SIZE, **unknown: Any) -> "ClipTextConditioner":
        """A text encoder with trained weights, from one of:

        - ``weights=FILE``: a safetensors file holding a CLIP text tower (open_clip
          key names). Its shape comes from, in order: ``config`` (a dict, a JSON
          string or a JSON file), ``arch`` (an open_clip architecture name), or the
          file's own metadata (files from ``minidiff clip train``, and minidiff
          model files with a clip conditioner, carry it).
        - ``arch=NAME, pretrained=TAG_OR_FILE``: an open_clip architecture with one
          of its pretrained tags (must already be in the Hugging Face cache; there
          is no download) or a local safetensors file.

        ``cache_size``: how many encoded prompts to keep (0 turns the cache off).
        """
        if unknown:
            raise MinidiffError(f"the 'clip' conditioner has no option '{sorted(unknown)[0]}'; its options: "
                                "weights, arch, pretrained, config, cache_size")
        if weights and pretrained:
            raise MinidiffError("give the clip weights once: --clip-weights FILE, or --clip-arch NAME "
                                "--clip-pretrained TAG|FILE")
        if weights:
            path = Path(weights)
            metadata, tensors = read_safetensors(path)
            cfg = (_config_option(config) if config is not None else arch_config(arch) if arch
                   else read_clip_config(metadata, path))
            if cfg is None:
                raise MinidiffError(f"'{path}' does not say which text model it holds (no minidiff-clip config "
                                    "in its metadata); also pass its open_clip architecture with --clip-arch")
            if metadata.get("format") == "minidiff":
                tensors = {k[len("conditioner."):]: v for k, v in tensors.items() if k.startswith("conditioner.")}
        elif arch and arch.startswith(HF_HUB_PREFIX) and not pretrained:
            cfg = arch_config(arch)
            path = hub_weights_file(arch)
            _, tensors = read_safetensors(path)
        elif arch:
            if not pretrained:
                raise MinidiffError(f"--clip-arch {arch} needs --clip-pretrained TAG or a local weights FILE; "
                                    "an untrained text encoder would condition on noise")
            path = Path(pretrained)
            local = path.exists() or path.suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES \
                or os.sep in pretrained
            cfg = arch_config(arch, None if local else pretrained)
            if not local:
                path = cached_pretrained_file(arch, pretrained)
            _, tensors = read_safetensors(path)
        else:
            raise MinidiffError("the clip conditioner needs weights: --clip-weights FILE (e.g. from "
                                "`minidiff clip train`), or --clip-arch NAME --clip-pretrained TAG|FILE")
        try:
            with torch.device("meta"):  # shapes only: a config that does not fit its file allocates nothing
                cls(cfg).check_fits(tensors, source=str(path))
        except ModelFileError:
            raise
        except MinidiffError as exc:  # the config itself: name the file it came from
            raise ModelFileError(f"'{path}' has an invalid clip config: {exc}") from None
        encoder = cls(cfg, cache_size=cache_size)
        encoder.load_text_weights(tensors, source=str(path))
        return encoder

    def load_text_weights(self, tensors: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Load an open_clip checkpoint's text tower (other parts are ignored); strict on names and shapes."""
        self.check_fits(tensors, source)
        self.load_state_dict(text_tensors(tensors), strict=True)

    def check_fits(self, tensors: dict[str, torch.Tensor], source: str = "weights") -> None:
        """A ModelFileError unless ``tensors`` hold exactly this text tower's tensors, by name and shape."""
        found = text_tensors(tensors)
        expected = self.state_dict()
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        if missing or extra:
            what = f"missing '{missing[0]}'" if missing else f"unexpected '{extra[0]}'"
            raise ModelFileError(f"'{source}' does not fit this CLIP text model: {what} "
                                 f"({len(missing)} missing, {len(extra)} unexpected tensors)")
        for key, value in found.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ModelFileError(f"'{source}' does not fit this CLIP text model: '{key}' has shape "
                                     f"{tuple(value.shape)}, expected {tuple(expected[key].shape)}")


def _pool(x: torch.Tensor, tokens: torch.Tensor, pool_type: str, eos_id: Optional[int]) -> torch.Tensor:
    """The sentence vector of hidden states x [B, L, D]: open_clip's ``text_global_pool``."""
    if pool_type == "first":
        return x[:, 0]
    if pool_type == "last":
        return x[:, -1]
    rows = torch.arange(x.shape[0], device=x.device)
    if pool_type == "argmax":  # the end-of-text token has the largest id of the vocabulary
        return x[rows, tokens.argmax(dim=-1)]
    if pool_type == "eos":
        return x[rows, (tokens == eos_id).int().argmax(dim=-1)]
    return x


# -- the text tower, laid out as open_clip's TextTransformer ---------------------------
# The text_cfg keys TextTower takes; keys that do not change the tower (tokenizer settings, those
# only for Hugging Face towers, which check_clip_config refuses, and final_ln_after_pool, which
# open_clip's builder does not pass on either); the options of open_clip's custom attention block.
TOWER_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value",
              "pad_id", "eos_id", "no_causal_mask", "pool_type", "proj_type", "proj_bias", "act_kwargs",
              "norm_kwargs"}
OTHER_KEYS = {"tokenizer_kwargs", "tokenizer_mode", "hf_tokenizer_name", "hf_model_name", "hf_model_pretrained",
              "hf_proj_type", "hf_pooler_type", "embed_cls", "output_tokens", "final_ln_after_pool", "block_type"}


def build_text_tower(embed_dim: int, text_cfg: dict[str, Any], quick_gelu: bool = False) -> nn.Module:
    """The text tower of an open_clip CLIP with this config: ``TextTower`` where it can, else open_clip's own."""
    custom = text_cfg.get("block_type") not in (None, "default") or any(text_cfg.get(k) for k in CUSTOM_BLOCK_KEYS)
    if not custom and set(text_cfg) <= TOWER_KEYS | OTHER_KEYS | set(CUSTOM_BLOCK_KEYS):
        return TextTower(embed_dim, quick_gelu=quick_gelu, **{k: v for k, v in text_cfg.items() if k in TOWER_KEYS})
    from open_clip.model import _build_text_tower  # imports open_clip's model zoo: seconds

    return _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)


def causal_mask(n: int) -> torch.Tensor:
    """The additive attention mask [n, n]: -inf above the diagonal, so token i sees tokens 0..i."""
    mask = torch.empty(n, n)
    if mask.is_meta:  # shapes only; triu_ there would import torch._dynamo (a second of cold start)
        return mask
    return mask.fill_(-math.inf).triu_(1)


class LayerNorm(nn.LayerNorm):
    """open_clip's LayerNorm: torch's, with the output cast back to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ResidualAttentionBlock(nn.Module):
    """Pre-norm causal self-attention and MLP, each a residual (open_clip's default block)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, ls_init_value: Optional[float],
                 act_layer: Callable[[], nn.Module], norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.ln_1 = norm_layer(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_2 = norm_layer(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act_layer()),
                                              ("c_proj", nn.Linear(hidden, width))]))
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q = self.ln_1(x)
        mask = attn_mask.to(q.dtype) if attn_mask is not None else None
        x = x + self.ls_1(self.attn(q, q, q, need_weights=False, attn_mask=mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, **block: Any):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, **block) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class TextTower(nn.Module):
    """open_clip's default ``TextTransformer`` (no class token), module for module and name for name.

    Built from torch.nn alone, so that encoding a prompt does not import open_clip's model zoo.
    The attributes are those ``ClipTextConditioner`` takes from open_clip's tower.
    """

    def __init__(self, embed_dim: int, context_length: int = 77, vocab_size: int = TOKENIZER_VOCAB,
                 width: int = 512, heads: int = 8, layers: int = 12, mlp_ratio: float = 4.0,
                 ls_init_value: Optional[float] = None, pad_id: int = 0, eos_id: int = 2,
                 no_causal_mask: bool = False, pool_type: str = "argmax", proj_type: str = "linear",
                 proj_bias: bool = False, act_kwargs: Optional[dict] = None, norm_kwargs: Optional[dict] = None,
                 quick_gelu: bool = False):
        super().__init__()
        if pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type must be one of {', '.join(POOL_TYPES)} (got {pool_type!r})")
        act = QuickGELU if quick_gelu else nn.GELU
        act_layer = functools.partial(act, **act_kwargs) if act_kwargs is not None else act
        norm_layer = functools.partial(LayerNorm, **norm_kwargs) if norm_kwargs else LayerNorm
        self.context_length, self.vocab_size, self.width = context_length, vocab_size, width
        self.output_dim, self.heads, self.pad_id, self.eos_id = embed_dim, heads, pad_id, eos_id
        self.pool_type = pool_type

        # _weight: skip nn.Embedding's own N(0, 1) draw, which init_parameters replaces anyway
        self.token_embedding = nn.Embedding(vocab_size, width, _weight=torch.empty(vocab_size, width))
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio=mlp_ratio, ls_init_value=ls_init_value,
                                       act_layer=act_layer, norm_layer=norm_layer)
        self.ln_final = norm_layer(width)
        if no_causal_mask:
            self.attn_mask = None
        else:
            self.register_buffer("attn_mask", causal_mask(context_length), persistent=False)
        if proj_type == "none" or not embed_dim:
            self.text_projection = None
        elif proj_bias:
            self.text_projection = nn.Linear(width, embed_dim)
        else:
            self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's initialisation (only seen by a tower that is not loaded with weights)."""
        if self.positional_embedding.is_meta:
            return  # shapes only (model files are checked on the meta device); normal_ there imports torch._dynamo
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std, attn_std, fc_std = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=width ** -0.5)
            nn.init.zeros_(self.text_projection.bias)
        elif self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=width ** -0.5)


def _config_option(config: dict | str) -> dict[str, Any]:
    """``config`` given as a dict, a JSON string, or the path of a JSON file."""
    if isinstance(config, dict):
        return config
    text = str(config)
    if not text.lstrip().startswith("{"):
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise MinidiffError(f"cannot read clip config '{config}': {exc.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise MinidiffError(f"clip config '{config}' is not valid JSON") from None
    if not isinstance(value, dict):
        raise MinidiffError("a clip config must be a JSON object with 'embed_dim' and 'text_cfg'")
    return value
