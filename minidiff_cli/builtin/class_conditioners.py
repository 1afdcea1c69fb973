"""The conditioners that need no text model: ``none`` and ``class``.

``none`` conditions on nothing: every prompt gives the empty Conditioning.

``class`` learns one vector per class name, plus one more for "no class", the
null row that classifier-free guidance contrasts against (Ho & Salimans 2022,
Sec. 3.2: a single network, trained with the label dropped at random, gives both
the conditional and the unconditional prediction). Prompts are matched to class
names loosely: case, spacing, ``_``/``-`` and a leading article do not matter, so
"A Red_Circle" means the class "red circle".
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
from torch import nn

from minidiff_cli.diffusion.conditioning import Conditioning, module_device
from minidiff_cli.errors import MinidiffError


def check_options(name: str, opts: dict[str, Any], allowed: Sequence[str]) -> None:
    """An unknown option is the user's typo: say which options exist."""
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        known = ", ".join(allowed) if allowed else "none"
        raise MinidiffError(f"the '{name}' conditioner has no option '{unknown[0]}'; its options: {known}")


class NoneConditioner(nn.Module):
    """Unconditional: every prompt, and the null input, is ``Conditioning(None, None)``."""

    name = "none"
    context_dim = None
    pooled_dim = None
    trainable = False
    storage_dtype = None

    def encode(self, prompts: list[str]) -> Conditioning:
        return Conditioning()

    def null(self, batch: int) -> Conditioning:
        return Conditioning()

    def config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NoneConditioner":
        return cls()

    @classmethod
    def from_options(cls, **opts: Any) -> "NoneConditioner":
        """No options."""
        check_options(cls.name, opts, ())
        return cls()


_ARTICLE = re.compile(r"^(a|an|the)\s+")


def normalize_class_name(text: str) -> str:
    """``"  A Red_Circle. "`` -> ``"red circle"``: the form prompts and class names are compared in."""
    text = re.sub(r"[_\-]+", " ", text.lower())
    text = re.sub(r"[^\w\s]+", " ", text)
    text = " ".join(text.split())
    return _ARTICLE.sub("", text)


class ClassConditioner(nn.Module):
    """A learned embedding per class: ``pooled`` [B, dim]; row ``num_classes`` is the null class."""

    name = "class"
    context_dim = None
    trainable = True
    storage_dtype = None

    def __init__(self, class_names: Sequence[str], dim: int = 128):
        super().__init__()
        self.class_names = [str(n) for n in class_names]
        if not self.class_names:
            raise MinidiffError("the 'class' conditioner needs at least one class name; "
                                "use a data set with classes, or the 'none' conditioner")
        if int(dim) < 1:
            raise MinidiffError(f"the class embedding size must be at least 1 (got {dim})")
        self.pooled_dim = self.dim = int(dim)
        self.index: dict[str, int] = {}
        for label, class_name in enumerate(self.class_names):
            key = normalize_class_name(class_name)
            if key in self.index:
                raise MinidiffError(f"class names '{self.class_names[self.index[key]]}' and '{class_name}' "
                                    "are the same once case and spacing are ignored; rename one")
            self.index[key] = label
        self.embedding = nn.Embedding(len(self.class_names) + 1, self.dim)  # last row: the null class

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def labels(self, prompts: list[str]) -> torch.Tensor:
        """The label of each prompt; the empty prompt "" is the null class."""
        labels = []
        for prompt in prompts:
            key = normalize_class_name(prompt)
            if key == "":
                labels.append(self.null_label)
            elif key in self.index:
                labels.append(self.index[key])
            else:
                raise MinidiffError(f"'{prompt}' is not a class of this model; "
                                    f"its classes are: {', '.join(self.class_names)}")
        return torch.tensor(labels, dtype=torch.long)

    def encode_labels(self, labels: torch.Tensor) -> Conditioning:
        """Labels [B] in 0..num_classes (num_classes = null) -> pooled [B, dim]."""
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_label):
            bad = labels[(labels < 0) | (labels > self.null_label)][0].item()
            raise MinidiffError(f"class label {bad} is out of range; this model has "
                                f"{self.num_classes} classes (0..{self.num_classes - 1})")
        return Conditioning(pooled=self.embedding(labels.to(module_device(self))))

    def encode(self, prompts: list[str]) -> Conditioning:
        return self.encode_labels(self.labels(list(prompts)))

    def null(self, batch: int) -> Conditioning:
        return self.encode_labels(torch.full((batch,), self.null_label, dtype=torch.long))

    def config(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names), "dim": self.dim}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ClassConditioner":
        return cls(config["class_names"], config["dim"])

    @classmethod
    def from_options(cls, **opts: Any) -> "ClassConditioner":
        """Options: ``class_names`` (list of str, required: the data set's ``class_names``),
        ``dim`` (int, default 128: the embedding size, the U-Net's ``pooled_dim``)."""
        check_options(cls.name, opts, ("class_names", "dim"))
        if not opts.get("class_names"):
            raise MinidiffError("the 'class' conditioner needs a data set with class names; "
                                "use --conditioner clip or none for data without classes")
        return cls(opts["class_names"], opts.get("dim", 128))
