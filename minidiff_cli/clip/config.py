"""The allow-list a CLIP config must pass before anything is built from it.

A CLIP config comes from a file (a ``minidiff clip train`` file, the clip conditioner
inside a model file, ``--clip-config``) and says what to build: how many layers, how
wide, how long a context, which tokenizer options. Files are hostile until checked, so
every key, type and range is checked here, cheaply and without allocating, the way
``UNetConfig.validate`` checks a U-Net: only the keys minidiff's own files and
open_clip's standard text configs use are accepted, with the values they use, and the
sizes are bounded so that what the config makes minidiff build (modules, parameters,
the causal mask, attention activations) is bounded too. In particular a config never
names a file: tokenizer keyword arguments are limited to ``clean``, so ``bpe_path``
(which open_clip's tokenizer would open) is refused.
"""

from __future__ import annotations

import math
from typing import Any

from minidiff_cli.errors import MinidiffError

TOKENIZER_VOCAB = 49408  # open_clip's SimpleTokenizer: BPE merges + bytes + 2 special tokens
MAX_CONTEXT = 1024  # open_clip's standard text towers use 32 to 77 tokens
MAX_WIDTH = 8192  # open_clip's widest text tower is 1280
MAX_LAYERS = 64  # ... and its deepest 36
MAX_HEADS = 256
MAX_VOCAB = 1_000_000  # 49408 or 64000 in open_clip's own-tokenizer configs
MAX_MLP_RATIO = 16.0
MAX_TEXT_PARAMETERS = 1_000_000_000  # ViT-bigG-14's text tower has 0.7 B
POOL_TYPES = ("first", "last", "argmax", "eos", "none")
PROJ_TYPES = ("linear", "none")
CLEAN_MODES = ("lower", "whitespace", "canonicalize")  # open_clip's SimpleTokenizer
GELU_APPROXIMATIONS = ("none", "tanh")
CUSTOM_BLOCK_KEYS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
FLAG_KEYS = ("no_causal_mask", "proj_bias", "output_tokens", "final_ln_after_pool", "embed_cls") + CUSTOM_BLOCK_KEYS
UNSUPPORTED = ("hf_model_name", "hf_tokenizer_name", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type")


def check_clip_config(config: Any) -> dict[str, Any]:
    """``{"embed_dim", "text_cfg", "quick_gelu"}``, checked; a MinidiffError (one line) otherwise."""
    if not isinstance(config, dict):
        raise MinidiffError(f"a clip config must be a JSON object, got {type(config).__name__}")
    _only(config, {"embed_dim", "text_cfg", "quick_gelu"}, "clip config")
    if "embed_dim" not in config or "text_cfg" not in config:
        raise MinidiffError("a clip config needs 'embed_dim' and 'text_cfg'")
    embed_dim = _int(config, "embed_dim", 1, MAX_WIDTH, "clip config")
    quick_gelu = _flag(config, "quick_gelu", "clip config")
    text_cfg = check_text_cfg(config["text_cfg"], quick_gelu)
    n = text_parameters(embed_dim, text_cfg)
    if n > MAX_TEXT_PARAMETERS:
        raise MinidiffError(f"this CLIP text tower would have {n / 1e6:,.0f}M parameters, more than the "
                            f"{MAX_TEXT_PARAMETERS // 1_000_000}M allowed")
    return {"embed_dim": embed_dim, "text_cfg": text_cfg, "quick_gelu": quick_gelu}


def check_text_cfg(text_cfg: Any, quick_gelu: bool = False) -> dict[str, Any]:
    where = "clip text_cfg"
    if not isinstance(text_cfg, dict):
        raise MinidiffError(f"{where} must be a JSON object, got {type(text_cfg).__name__}")
    if any(text_cfg.get(k) for k in UNSUPPORTED):
        raise MinidiffError("this CLIP uses a Hugging Face text model or tokenizer; the clip conditioner "
                            "supports open_clip's own text transformer and tokenizer only")
    known = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value", "pad_id",
             "eos_id", "pool_type", "proj_type", "act_kwargs", "norm_kwargs", "tokenizer_kwargs", "block_type",
             *FLAG_KEYS, *UNSUPPORTED}
    _only(text_cfg, known, where)
    if text_cfg.get("embed_cls"):
        raise MinidiffError("text towers with a class token (CoCa) are not supported by the clip conditioner")
    _int(text_cfg, "context_length", 4, MAX_CONTEXT, where, default=77)
    vocab = _int(text_cfg, "vocab_size", TOKENIZER_VOCAB, MAX_VOCAB, where,
                                     default=TOKENIZER_VOCAB)
    width = _int(text_cfg, "width", 1, MAX_WIDTH, where, default=512)
    heads = _int(text_cfg, "heads", 1, MAX_HEADS, where, default=8)
    _int(text_cfg, "layers", 1, MAX_LAYERS, where, default=12)
    if width % heads:
        raise MinidiffError(f"{where}: width {width} must be a multiple of heads {heads}")
    for key in ("pad_id", "eos_id"):
        if key in text_cfg:
            _int(text_cfg, key, 0, vocab - 1, where)
    if "mlp_ratio" in text_cfg:
        _number(text_cfg, "mlp_ratio", where, low=1 / width, high=MAX_MLP_RATIO)
    if text_cfg.get("ls_init_value") is not None:
        _number(text_cfg, "ls_init_value", where, low=-1e3, high=1e3)
    for key in FLAG_KEYS:
        if key in text_cfg:
            _flag(text_cfg, key, where)
    _choice(text_cfg, "pool_type", POOL_TYPES, where)
    _choice(text_cfg, "proj_type", PROJ_TYPES, where)
    _choice(text_cfg, "block_type", (None, "default", "custom"), where)
    _check_kwargs(text_cfg, quick_gelu, where)
    return dict(text_cfg)  # every value is of its exact type: nothing to convert


def check_clip_model_config(config: Any) -> dict[str, Any]:
    """A whole CLIP's config (``clip train``'s files): the text part as above plus its image tower."""
    if not isinstance(config, dict) or not isinstance(config.get("vision_cfg"), dict):
        raise MinidiffError("a CLIP config needs a 'vision_cfg' object")
    text = check_clip_config({k: v for k, v in config.items() if k != "vision_cfg"})
    return {**text, "vision_cfg": check_vision_cfg(config["vision_cfg"])}


MAX_VISION_WIDTH = 1024
MAX_VISION_IMAGE = 512  # clip train's image-size limit


def check_vision_cfg(vision_cfg: Any) -> dict[str, Any]:
    """The image tower of a ``minidiff clip train`` file (a small ViT or ModifiedResNet), checked."""
    where = "clip vision_cfg"
    if not isinstance(vision_cfg, dict):
        raise MinidiffError(f"{where} must be a JSON object, got {type(vision_cfg).__name__}")
    _only(vision_cfg, {"image_size", "patch_size", "width", "layers", "head_width"}, where)
    size = _int(vision_cfg, "image_size", 1, MAX_VISION_IMAGE, where)
    width = _int(vision_cfg, "width", 1, MAX_VISION_WIDTH, where)
    head_width = _int(vision_cfg, "head_width", 1, max(64, width), where)
    layers = vision_cfg.get("layers")
    resnet = isinstance(layers, list)
    # open_clip's heads: width * 32 // head_width for the ResNet's attention pool, width // head_width for a ViT
    stride, channels = (32, width * 32) if resnet else (vision_cfg.get("patch_size"), width)
    heads = channels // head_width
    if resnet:  # blocks per stage
        if len(layers) != 4:
            raise MinidiffError(f"{where}: a ResNet's layers must list 4 stages, got {_show(layers)}")
        for i in range(4):
            _int({"layers": layers[i]}, "layers", 1, MAX_LAYERS, where)
        n = sum(n_i * 17 * (width << i) ** 2 for i, n_i in enumerate(layers))
    else:
        _int(vision_cfg, "layers", 1, MAX_LAYERS, where)
        _int(vision_cfg, "patch_size", 1, size, where)
        n = 12 * layers * width * width
    if size % stride:
        raise MinidiffError(f"{where}: image_size {size} must be a multiple of {stride}")
    if not heads or channels % heads:
        raise MinidiffError(f"{where}: head_width {head_width} does not split {channels} channels into heads")
    if n > MAX_TEXT_PARAMETERS:
        raise MinidiffError(f"this CLIP image tower would have {n / 1e6:,.0f}M parameters, more than the "
                            f"{MAX_TEXT_PARAMETERS // 1_000_000}M allowed")
    return dict(vision_cfg)


def _check_kwargs(text_cfg: dict[str, Any], quick_gelu: bool, where: str) -> None:
    """The keyword dicts open_clip passes on to GELU, LayerNorm and its tokenizer: a few known keys."""
    act = _kwargs(text_cfg, "act_kwargs", set() if quick_gelu else {"approximate"}, where)
    _choice(act, "approximate", GELU_APPROXIMATIONS, f"{where} act_kwargs")
    norm = _kwargs(text_cfg, "norm_kwargs", {"eps"}, where)
    if "eps" in norm:
        _number(norm, "eps", f"{where} norm_kwargs", low=1e-12, high=1.0)
    tok = _kwargs(text_cfg, "tokenizer_kwargs", {"clean"}, where)
    _choice(tok, "clean", CLEAN_MODES, f"{where} tokenizer_kwargs")


def text_parameters(embed_dim: int, text_cfg: dict[str, Any]) -> int:
    """About the parameter count of the text tower (open_clip's TextTransformer); no allocation."""
    w, L = text_cfg.get("width", 512), text_cfg.get("layers", 12)
    hidden = int(w * text_cfg.get("mlp_ratio", 4.0))
    block = 4 * w * w + 4 * w + 2 * w * hidden + hidden + w + 4 * w
    vocab, context = text_cfg.get("vocab_size", TOKENIZER_VOCAB), text_cfg.get("context_length", 77)
    return vocab * w + context * w + L * block + 2 * w + w * embed_dim


def _only(d: dict, known: set, where: str) -> None:
    unknown = sorted(str(k) for k in set(d) - known)
    if unknown:
        raise MinidiffError(f"{where} has unknown key '{unknown[0][:60]}' (known: {', '.join(sorted(known))})")


def _int(d: dict, key: str, low: int, high: int, where: str, default: Any = None) -> int:
    value = d.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise MinidiffError(f"{where}: {key} must be a whole number from {low} to {high:,}, got {_show(value)}")
    return value


def _number(d: dict, key: str, where: str, low: float, high: float) -> float:
    value = d[key]
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not low <= value <= high):
        raise MinidiffError(f"{where}: {key} must be a number from {low:g} to {high:g}, got {_show(value)}")
    return value


def _flag(d: dict, key: str, where: str) -> bool:
    value = d.get(key, False)
    if not isinstance(value, bool):
        raise MinidiffError(f"{where}: {key} must be true or false, got {_show(value)}")
    return value


def _choice(d: dict, key: str, allowed: tuple, where: str) -> None:
    if key in d and d[key] not in allowed:
        names = ", ".join(str(a) for a in allowed if a is not None)
        raise MinidiffError(f"{where}: {key} must be one of {names}, got {_show(d[key])}")


def _kwargs(d: dict, key: str, allowed: set, where: str) -> dict:
    value = d.get(key) or {}
    if not isinstance(value, dict):
        raise MinidiffError(f"{where}: {key} must be a JSON object, got {_show(value)}")
    extra = sorted(str(k) for k in set(value) - allowed)
    if extra:
        can = f"only {', '.join(sorted(allowed))}" if allowed else "none"
        raise MinidiffError(f"{where}: {key} may not set '{extra[0][:60]}' (it may set {can})")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."
