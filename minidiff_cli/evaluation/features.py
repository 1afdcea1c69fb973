"""Feature spaces for the metrics: a CLIP image tower, and the Inception-v3 of standard FID.

Images come in as float tensors [B, 3, H, W] in [-1, 1] (minidiff's convention) at any size.

- ``ClipFeatures``: the image tower of a CLIP trained on the folder (``clip train``, or
  stage 1 of ``train --conditioner clip``), normalised embeddings. It knows the folder's
  pictures, so it separates them far better than a generic network that never saw them;
  its figures compare models judged by the same CLIP file only.
- ``InceptionFeatures``: the 2048-d pool features of the Inception-v3 that FID is defined
  with (torch-fidelity's port of the TensorFlow graph, images resized to 299 inside).
  Its weights cannot be downloaded here, and the usual file is a pickle; minidiff reads
  them from a safetensors file the user converts once (see docs/metrics.md).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from minidiff_cli.errors import ModelFileError


class ClipFeatures(torch.nn.Module):
    """Normalised CLIP image embeddings of images in [-1, 1]."""

    def __init__(self, clip_model):
        super().__init__()
        self.clip = clip_model.eval()

    @property
    def dim(self) -> int:
        return int(self.clip.text_projection.shape[1]) if self.clip.text_projection is not None else 0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from minidiff_cli.clip.clip_file import encode_images

        return encode_images(self.clip, images).float()

    @torch.no_grad()
    def encode_text(self, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        from minidiff_cli.clip.tokenizer import tokenizer_for

        tokenizer = tokenizer_for({"context_length": self.clip.context_length})
        device = next(self.clip.parameters()).device
        return torch.cat([self.clip.encode_text(tokenizer(captions[i:i + batch_size]).to(device), normalize=True)
                          for i in range(0, len(captions), batch_size)]).float()


def load_clip_features(path: str | os.PathLike) -> ClipFeatures:
    from minidiff_cli.clip.clip_file import load_clip

    model, _ = load_clip(path)
    return ClipFeatures(model)


class InceptionFeatures(torch.nn.Module):
    """The 2048-d Inception-v3 pool features of FID, for images in [-1, 1]."""

    dim = 2048

    def __init__(self, extractor):
        super().__init__()
        self.extractor = extractor

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # what FID's network was fed
        return self.extractor(pixels)[0].reshape(len(images), -1).float()


@contextmanager
def _weights_from(state_dict: dict[str, torch.Tensor]):
    """torch-fidelity's extractor fetches its weights from a URL when given no path (and
    unpickles a file when given one); hand it ``state_dict`` instead, for its constructor only."""
    import torch_fidelity.feature_extractor_inceptionv3 as module

    original = module.load_state_dict_from_url
    module.load_state_dict_from_url = lambda *args, **kwargs: state_dict
    try:
        yield
    finally:
        module.load_state_dict_from_url = original


def load_inception(path: str | os.PathLike) -> InceptionFeatures:
    """FID's Inception-v3 with the weights of safetensors file ``path`` (checked before use)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"Inception weights '{path}' do not exist")
    try:
        state_dict = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"'{path}' is not a safetensors file of Inception weights: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    try:
        with _weights_from(state_dict):
            extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    except RuntimeError as exc:  # names or shapes that are not FID's Inception-v3
        first = str(exc).strip().splitlines()[0]
        raise ModelFileError(f"'{path}' does not hold FID's Inception-v3 weights: {first}") from None
    return InceptionFeatures(extractor.eval())
