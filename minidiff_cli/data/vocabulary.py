"""The words a model met in its training captions, and the prompt words it never did.

A model trained on "a red circle" knows nothing of "crimson" or "cat": its text encoder
still maps them somewhere, and the model draws whatever lies nearest, with no sign that
it is guessing. ``minidiff train`` stores the vocabulary of the captions it trained on
(held-out captions excluded) in the model file's config, and ``generate`` warns about a
prompt's other words. A word is a run of letters and digits, lowercased ("Thumbs-up" is
"thumbs" and "up"), so punctuation and case do not count as new words.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
MAX_WORDS = 100_000  # a model file's vocabulary is checked against this when read


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def vocabulary(captions: Iterable[str]) -> list[str]:
    """Every word of ``captions``, sorted."""
    found: set[str] = set()
    for caption in captions:
        found.update(words(caption))
    return sorted(found)


def model_vocabulary(config: dict) -> Optional[set[str]]:
    """The words a model file's config says it trained on; None when it does not say."""
    stored = config.get("vocabulary")
    if isinstance(stored, list) and len(stored) <= MAX_WORDS and all(isinstance(w, str) for w in stored):
        return set(stored)
    names = config.get("class_names")
    if config.get("conditioner", {}).get("name") == "class" and isinstance(names, list):
        return set(vocabulary(str(n) for n in names))  # a class model knows its class names
    return None


def unknown_words(prompt: str, known: set[str]) -> list[str]:
    """The prompt's words that are not in ``known``, in order, each once."""
    return list(dict.fromkeys(w for w in words(prompt) if w not in known))


def prompt_warnings(prompt: str, config: dict, conditioner, model: str | None = None) -> list[str]:
    """One-line warnings about a prompt for this model: words it never saw, a cut, an empty prompt.

    ``model``: the --model value as given (None: the default model), named in the `minidiff info` hint."""
    name = getattr(conditioner, "name", "")
    if name == "none":
        return ["this model is unconditional; the prompt is ignored"] if prompt else []
    if not prompt.strip():
        return ["the prompt is empty: the model draws what it learned without a caption (unconditional)"]
    notes = []
    known = model_vocabulary(config)
    unknown = unknown_words(prompt, known) if known is not None else []
    if unknown:
        shown = ", ".join(repr(w) for w in unknown[:8]) + (", ..." if len(unknown) > 8 else "")
        notes.append(f"this model never saw {shown} in its training captions, so it can only guess; "
                     f"`{info_command(model)}` lists the words it knows")
    cut = getattr(conditioner, "cut_words", None)
    dropped = cut(prompt) if cut is not None else ""
    if dropped:
        notes.append(f"the prompt is longer than the text encoder's {conditioner.context_length} tokens; "
                     f"ignored: {dropped!r:.80}")
    return notes


def info_command(model: str | None) -> str:
    """The `minidiff info` command that describes ``model`` (the default model without an argument)."""
    import shlex

    return "minidiff info" if model is None else f"minidiff info {shlex.quote(str(model))}"


def article(word: str) -> str:
    """The indefinite article before ``word``, by its first letter: "an orange", "a red"."""
    return "an" if word[:1] in "aeiou" else "a"
