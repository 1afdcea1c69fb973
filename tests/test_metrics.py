"""The metrics of `eval --data` on cases with known answers, and the Inception file loader."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from minidiff_cli.errors import ModelFileError
from minidiff_cli.evaluation.distribution import frechet_distance, kernel_distance, precision_recall
from minidiff_cli.evaluation.text_image import clip_score, r_precision


def gaussian(n: int = 2000, d: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_frechet_distance_of_a_shift_is_its_squared_length():
    real = gaussian()
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(real, real + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_frechet_distance_of_a_doubled_scale_is_the_trace_of_the_covariance():
    real = gaussian()
    cov = torch.cov(real.T)
    # Tr(S + 4S - 2 (S 4S)^(1/2)) = Tr(S + 4S - 4S) = Tr(S); the means stay at the sample mean's 2x
    mean = real.mean(0)
    expected = float(mean @ mean + torch.trace(cov))
    assert frechet_distance(real, 2 * real) == pytest.approx(expected, rel=1e-5)


def test_kid_is_near_zero_for_one_distribution_and_not_for_another():
    real, other = gaussian(seed=0), gaussian(seed=1)
    same, _ = kernel_distance(real, other, subset_size=500, subsets=20)
    moved, _ = kernel_distance(real, other + 1.0, subset_size=500, subsets=20)
    assert abs(same) < 0.01 and moved > 0.5
    assert kernel_distance(real, other, seed=3) == kernel_distance(real, other, seed=3)  # seeded subsets


def test_precision_and_recall_count_the_points_inside_the_other_sets_manifold():
    grid = torch.stack(torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij"), -1).reshape(-1, 2)
    assert precision_recall(grid, grid) == (1.0, 1.0)
    far = grid + 1000
    assert precision_recall(grid, far) == (0.0, 0.0)
    half = torch.cat([grid[:50], far[:50]])  # half realistic, and covering the lower half of the grid
    precision, recall = precision_recall(grid, half)
    assert precision == 0.5 and 0.45 <= recall <= 0.65


def test_clip_score_is_100_times_the_cosine_floored_at_zero():
    e = torch.eye(3)
    assert clip_score(e, e) == pytest.approx(100.0)
    assert clip_score(e, e.roll(1, dims=0)) == 0.0
    assert clip_score(e, -e) == 0.0
    half = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0, 0.0]]), dim=1)
    assert clip_score(half, e[:1]) == pytest.approx(100 / 2 ** 0.5, rel=1e-6)


def test_r_precision_is_one_for_a_perfect_match_and_chance_for_noise():
    pool = torch.eye(200)
    rows = list(range(200))
    assert r_precision(pool, pool, pool, rows, candidates=100) == 1.0
    noise = torch.nn.functional.normalize(torch.randn(200, 200, generator=torch.Generator().manual_seed(0)), dim=1)
    chance = r_precision(noise, pool, pool, rows, candidates=10)
    assert 0.04 <= chance <= 0.17  # 1/10, within sampling error of 200 images


def random_inception_file(path, monkeypatch):
    """FID's Inception-v3 architecture with random weights, saved as safetensors (the real ones
    cannot be downloaded here); returns the module whose weights the file holds."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from minidiff_cli.evaluation.features import _weights_from

    with monkeypatch.context() as patch:
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        with _weights_from({}):
            module = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    return module


def test_the_inception_loader_reads_safetensors_weights_and_gives_2048_features(tmp_path, monkeypatch):
    from minidiff_cli.evaluation.features import load_inception

    reference = random_inception_file(tmp_path / "inception.safetensors", monkeypatch)
    features = load_inception(tmp_path / "inception.safetensors")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    out = features(images)
    assert out.shape == (2, 2048)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8)
    with torch.no_grad():
        assert torch.allclose(out, reference(pixels)[0].reshape(2, -1).float())


def test_the_inception_loader_refuses_other_files_in_one_line(tmp_path):
    from minidiff_cli.evaluation.features import load_inception

    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelFileError, match="does not hold FID's Inception-v3 weights"):
        load_inception(tmp_path / "other.safetensors")
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ModelFileError, match="is not a safetensors file"):
        load_inception(tmp_path / "pickle.pt")


def test_r_precision_of_a_subset_is_the_share_of_its_images_in_the_whole():
    pool = torch.nn.functional.normalize(torch.randn(300, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    images = torch.nn.functional.normalize(pool + 0.35 * torch.randn(300, 16, generator=torch.Generator()
                                                                       .manual_seed(2)), dim=1)
    rows = list(range(300))
    whole = r_precision(images, pool, pool, rows)
    first, second = r_precision(images[:100], pool[:100], pool, rows[:100]), \
        r_precision(images[100:], pool[100:], pool, rows[100:])
    assert 0.05 < whole < 0.95
    assert whole == pytest.approx((100 * first + 200 * second) / 300)
