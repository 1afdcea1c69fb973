"""Distances between the distribution of generated images and that of real ones, in a feature space.

Every function takes two float tensors of features, ``real`` [N, D] and ``fake`` [M, D].

- Frechet distance (Heusel et al. 2017): fit a Gaussian to each set and take
  ``|mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))``. Lower is better, 0 for equal
  Gaussians. It is biased upwards for small sets: compare only figures with the same
  sample counts (at least a few times D samples for a stable figure).
- KID (Binkowski et al. 2018): the squared MMD with the cubic polynomial kernel, averaged
  over random subsets. Unbiased, so usable with a few hundred samples; reported as
  mean and standard deviation over the subsets.
- Precision and recall (Kynkaanniemi et al. 2019): the real set's manifold is the union
  of balls around each real feature reaching its k-th nearest real neighbour; precision
  is the share of generated features inside it (are the images realistic?), recall the
  share of real features inside the generated set's manifold (is the data covered?).

The Frechet distance and KID are torchmetrics' (``FrechetInceptionDistance`` and
``KernelInceptionDistance`` accept any feature extractor; here an identity over
features computed once). Precision and recall are a k-nearest-neighbour count.
"""

from __future__ import annotations

import torch


class _Features(torch.nn.Module):
    """The identity, for torchmetrics: the inputs already are features of width ``num_features``."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check(real: torch.Tensor, fake: torch.Tensor, minimum: int = 2) -> None:
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D (got {tuple(real.shape)}, {tuple(fake.shape)})")
    if len(real) < minimum or len(fake) < minimum:
        raise ValueError(f"need at least {minimum} real and generated samples (got {len(real)}, {len(fake)})")


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The Frechet distance between Gaussians fitted to ``real`` and ``fake``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check(real, fake)
    metric = FrechetInceptionDistance(feature=_Features(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    # A distance is never below 0; the matrix square root's rounding can give -1e-9 for equal sets.
    return max(0.0, float(metric.compute()))


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, *, subset_size: int = 100, subsets: int = 100,
                    seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets of ``subset_size``, capped by the set sizes)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check(real, fake)
    import warnings

    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features": they are few here, by design
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Features(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # the subsets come from torch's global generator
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each feature to its k-th nearest other feature of the same set."""
    distances = torch.cdist(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # +1: the nearest is the point itself, at 0


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each point, whether it lies in at least one ball (centre, radius)."""
    return (torch.cdist(points, centres) <= radii[None, :]).any(dim=1)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall with k nearest neighbours (the paper uses k = 3)."""
    _check(real, fake, minimum=k + 1)
    real, fake = real.double(), fake.double()
    precision = _covered(fake, real, _radii(real, k)).double().mean()
    recall = _covered(real, fake, _radii(fake, k)).double().mean()
    return float(precision), float(recall)
