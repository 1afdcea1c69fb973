"""The sampler contract's partial runs (``PartialSampler``): noise_levels, sample(start=, stop=).

With the exact Gaussian denoiser (data x0 ~ N(MU, S^2)) the law of x at alpha_bar level a is known,
N(sqrt(a) MU, a S^2 + 1 - a), so a run stopped part way must land on the level noise_levels
names, and a run split in two must be the whole run where the method has no memory.
"""

import math

import pytest
import torch

from minidiff_cli import plugins
from minidiff_cli.diffusion.sampling import gaussian_denoiser, supports_partial
from minidiff_cli.diffusion.schedule import get_schedule
from minidiff_cli.errors import MinidiffError
from minidiff_cli.plugins import get_sampler

MU, S, N = 0.5, 0.5, 20_000
# Each sampler, and each option that moves its grid.
CASES = [("ddpm", {}), ("ddim", {}), ("ddim", {"eta": 1.0, "spacing": "leading"}), ("dpmpp-2m", {}),
         ("dpmpp-2m", {"karras": True}), ("euler", {"spacing": "linspace"}), ("heun", {"karras": True}),
         ("euler-ancestral", {})]
MEMORYLESS = [("ddim", {}), ("euler", {}), ("heun", {"karras": True})]  # deterministic one-step methods


def test_the_built_in_and_first_party_samplers_can_start_part_way():
    registry = plugins.registry()
    first_party = [n for n in registry.names("samplers") if registry.owner("samplers", n) in ("minidiff.samplers",
                                                                                              "solvers")]
    assert sorted(first_party) == ["ddim", "ddpm", "dpmpp-2m", "euler", "euler-ancestral", "heun", "lcm"]
    assert all(supports_partial(get_sampler(name)) for name in first_party)


def test_a_sampler_without_start_and_stop_does_not_count():
    class Old:
        name, default_steps = "old", 10

        def sample(self, denoiser, x, schedule, steps, *, generator=None, callback=None, **opts):
            return x

        def noise_levels(self, schedule, steps, **opts):
            return [1.0] * (steps + 1)

    class NoLevels:
        name, default_steps = "no-levels", 10

        def sample(self, denoiser, x, schedule, steps, *, start=0, stop=None, **opts):
            return x

    assert not supports_partial(Old()) and not supports_partial(NoLevels())


@pytest.mark.parametrize("name, opts", CASES)
def test_noise_levels_run_from_the_noisiest_to_clean(name, opts):
    schedule = get_schedule("cosine", 1000)
    levels = get_sampler(name).noise_levels(schedule, 10, **opts)
    assert len(levels) == 11 and levels[-1] == 1.0 and all(a < b for a, b in zip(levels, levels[1:]))
    if opts.get("karras") or opts.get("spacing", "trailing") == "trailing":  # from minidiff's noise at T - 1
        assert levels[0] == pytest.approx(schedule.alphas_cumprod[-1].item(), rel=1e-9)


@pytest.mark.parametrize("name, opts", CASES)
def test_a_run_stopped_part_way_lands_on_the_level_noise_levels_names(name, opts):
    schedule = get_schedule("cosine", 1000)
    sampler, g = get_sampler(name), torch.Generator().manual_seed(0)
    steps, stop = 20, 8
    a = sampler.noise_levels(schedule, steps, **opts)[stop]
    x = sampler.sample(gaussian_denoiser(schedule, MU, S), torch.randn(N, generator=g), schedule, steps,
                       generator=g, stop=stop, **opts)
    assert x.mean().item() == pytest.approx(math.sqrt(a) * MU, abs=0.03)
    assert x.std().item() == pytest.approx(math.sqrt(a * S * S + 1 - a), rel=0.04)


def started_at(sampler, schedule, steps, start, seed, **opts):
    """Data noised to the level of step ``start``, then sampled from there."""
    g = torch.Generator().manual_seed(seed)
    a = sampler.noise_levels(schedule, steps, **opts)[start]
    x_t = math.sqrt(a) * (MU + S * torch.randn(N, generator=g)) + math.sqrt(1 - a) * torch.randn(N, generator=g)
    return sampler.sample(gaussian_denoiser(schedule, MU, S), x_t, schedule, steps, generator=g, start=start, **opts)


@pytest.mark.parametrize("name, opts", CASES)
def test_a_run_started_part_way_from_the_right_level_gives_the_data_back(name, opts):
    # At 20 steps the first-order samplers' own discretisation error shrinks the std (DDIM: 0.463, not
    # 0.5); a run started part way must be no further off than the whole run, up to sampling error.
    schedule = get_schedule("cosine", 1000)
    sampler = get_sampler(name)
    whole, part = (started_at(sampler, schedule, 20, start, seed=1, **opts) for start in (0, 6))
    assert part.mean().item() == pytest.approx(MU, abs=0.02)
    assert abs(part.std().item() - S) <= abs(whole.std().item() - S) + 0.01


@pytest.mark.parametrize("name, opts", MEMORYLESS)
def test_a_deterministic_run_split_in_two_is_the_whole_run(name, opts):
    schedule = get_schedule("linear", 1000)
    sampler, denoiser = get_sampler(name), gaussian_denoiser(schedule, MU, S)
    x = torch.randn(64, generator=torch.Generator().manual_seed(2))
    whole = sampler.sample(denoiser, x, schedule, 12, **opts)
    half = sampler.sample(denoiser, x, schedule, 12, stop=5, **opts)
    assert torch.allclose(sampler.sample(denoiser, half, schedule, 12, start=5, **opts), whole, atol=1e-5)


@pytest.mark.parametrize("name, opts", CASES)
def test_callbacks_of_a_partial_run_keep_the_whole_grids_step_numbers(name, opts):
    schedule = get_schedule("cosine", 100)
    seen = []
    get_sampler(name).sample(gaussian_denoiser(schedule, MU, S), torch.randn(4), schedule, 10, start=3, stop=7,
                             callback=lambda info: seen.append((info["i"], info["steps"])), **opts)
    assert seen == [(i, 10) for i in range(3, 7)]


@pytest.mark.parametrize("start, stop", [(-1, None), (5, 5), (0, 11), (3, 2), (1.5, None)])
def test_a_range_outside_the_grid_is_refused(start, stop):
    schedule = get_schedule("cosine", 100)
    for name, opts in CASES:
        with pytest.raises(MinidiffError, match="a partial run needs 0 <= start < stop <= steps=10"):
            get_sampler(name).sample(gaussian_denoiser(schedule), torch.randn(4), schedule, 10,
                                     start=start, stop=stop, **opts)


def test_noise_levels_refuse_options_the_sampler_does_not_take():
    schedule = get_schedule("cosine", 100)
    with pytest.raises(MinidiffError, match="sampler 'ddim' has no option etta; its options are: eta, spacing"):
        get_sampler("ddim").noise_levels(schedule, 10, etta=1)
    with pytest.raises(MinidiffError, match="sampler 'euler' has no option eta; its options are: karras, spacing"):
        get_sampler("euler").noise_levels(schedule, 10, eta=1)
