"""CLIP's text transformer laid out as open_clip's default ``TextTransformer``, under the same names.

Building it here instead of through open_clip keeps ``generate`` from importing open_clip's
model zoo; a test checks names, shapes and outputs against open_clip's own tower. Towers
with open_clip's custom attention blocks are built by open_clip itself.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from minidiff_cli.clip.config import CUSTOM_BLOCK_KEYS, POOL_TYPES, TOKENIZER_VOCAB

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
