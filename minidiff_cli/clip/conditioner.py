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

Where the pieces come from: ``clip.weights`` finds and reads the weight files (safetensors
only, never a pickle), ``clip.tokenizer`` loads open_clip's tokenizer without open_clip's
heavy package import, ``clip.text_tower`` builds open_clip's default text transformer under
its own names (other towers are built by open_clip itself).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from minidiff_cli.clip.config import check_clip_config
from minidiff_cli.clip.text_tower import build_text_tower
from minidiff_cli.clip.tokenizer import tokenizer_for
from minidiff_cli.clip.weights import (
    HF_HUB_PREFIX,
    PICKLE_SUFFIXES,
    arch_config,
    cached_pretrained_file,
    hub_weights_file,
    read_clip_config,
    read_safetensors,
    text_tensors,
)
from minidiff_cli.diffusion.conditioning import Conditioning, module_device
from minidiff_cli.errors import MinidiffError, ModelFileError

DEFAULT_CACHE_SIZE = 256


# -- reading weight files ----------------------------------------------------------


# -- open_clip configs and pretrained weights --------------------------------------


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
