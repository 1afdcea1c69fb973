"""The U-Net core: shapes, gradients, conditioning, batch independence, config checks."""

import json
import time

import pytest
import torch
from conftest import assert_error, timed_cli
from tinymodels import CLASS_NAMES, tiny_config

from minidiff_cli.errors import MinidiffError
from minidiff_cli.nets.unet import UNet, UNetConfig, timestep_embedding

# Small widths keep every test well under a second on a CPU.
TINY = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4, head_dim=8)


def tiny(**overrides) -> UNetConfig:
    return UNetConfig(**{**TINY, "image_size": 16, "attention_resolutions": (8,),
                         "cross_attention_resolutions": (8,), **overrides})


def inputs(cfg: UNetConfig, batch=2, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, tokens, cfg.context_dim, generator=g) if cfg.context_dim else None
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g) if cfg.pooled_dim else None
    return x, t, context, pooled


def perturbed(model: UNet, scale=0.05, seed=1) -> UNet:
    """Nudge every weight, so the zero-initialised branches pass signal and gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


CONFIGS = {
    "plain": tiny(attention_resolutions=(), mid_attention=False),
    "self-attention": tiny(),
    "self-attention at two sizes": tiny(attention_resolutions=(16, 8)),
    "context": tiny(context_dim=12),
    "cross-attention only": tiny(context_dim=12, attention_resolutions=(), cross_attention_resolutions=(16,)),
    "pooled": tiny(pooled_dim=7),
    "context and pooled": tiny(context_dim=12, pooled_dim=7),
    "three levels, 1-2-4": tiny(channel_mult=(1, 2, 4), attention_resolutions=(4,), context_dim=6,
                                cross_attention_resolutions=(8, 4)),
    "one level": tiny(channel_mult=(1,), attention_resolutions=(16,)),
    "first level wider than base": tiny(channel_mult=(2, 3), attention_resolutions=()),
    "three blocks per level": tiny(num_res_blocks=3),
    "grey in, six out, dropout": tiny(in_channels=1, out_channels=6, dropout=0.1),
    "odd base width": tiny(base_channels=9, norm_groups=3, head_dim=9, attention_resolutions=(16,)),
}


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_output_has_the_input_spatial_size_at_each_image_size(size):
    cfg = tiny(image_size=size, channel_mult=(1, 2, 2), attention_resolutions=(size // 4,),
               context_dim=8, cross_attention_resolutions=(size // 2, size // 4), pooled_dim=8)
    x, t, context, pooled = inputs(cfg)
    assert UNet(cfg)(x, t, context, pooled).shape == (2, 3, size, size)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_shape_and_parameter_count_for_each_config(name):
    cfg = CONFIGS[name]
    model = UNet(cfg)
    x, t, context, pooled = inputs(cfg)
    assert model(x, t, context, pooled).shape == (2, cfg.out_channels, cfg.image_size, cfg.image_size)
    # The config's count comes from formulas; it must match the real module exactly.
    assert cfg.num_parameters() == model.num_parameters()


def test_parameter_count_formula_matches_the_default_and_a_large_model():
    for cfg in (UNetConfig(), UNetConfig(base_channels=64, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                                         attention_resolutions=(16, 8), context_dim=77, pooled_dim=33,
                                         cross_attention_resolutions=(32, 8))):
        assert cfg.num_parameters() == UNet(cfg).num_parameters()


def test_time_mlp_is_four_times_base_width():
    model = UNet(tiny())
    assert model.time_mlp[0].out_features == 4 * 16


def test_untrained_model_predicts_exactly_zero():
    # Zero-initialised final conv: the first training steps start from a zero prediction.
    cfg = tiny(context_dim=12, pooled_dim=7)
    out = UNet(cfg)(*inputs(cfg))
    assert torch.count_nonzero(out) == 0


def test_gradients_reach_every_parameter():
    cfg = tiny(context_dim=12, pooled_dim=7, attention_resolutions=(16, 8), cross_attention_resolutions=(16, 8))
    model = perturbed(UNet(cfg))
    x, t, context, pooled = inputs(cfg)
    model(x, t, context, pooled).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.count_nonzero(p.grad) > 0, f"{name} got an all-zero gradient"


def test_gradient_flows_through_zero_initialised_model_to_the_output_conv():
    # Even untouched, the last conv learns on the first step (and then unblocks the rest).
    cfg = tiny()
    model = UNet(cfg)
    x, t, _, _ = inputs(cfg)
    (model(x, t) - x).square().mean().backward()
    assert torch.count_nonzero(model.conv_out.weight.grad) > 0


def test_context_changes_the_output():
    cfg = tiny(context_dim=12)
    model = perturbed(UNet(cfg)).eval()
    x, t, context, _ = inputs(cfg)
    assert not torch.allclose(model(x, t, context), model(x, t, torch.randn_like(context)), atol=1e-4)


def test_pooled_changes_the_output():
    cfg = tiny(pooled_dim=7)
    model = perturbed(UNet(cfg)).eval()
    x, t, _, pooled = inputs(cfg)
    assert not torch.allclose(model(x, t, pooled=pooled), model(x, t, pooled=torch.randn_like(pooled)), atol=1e-4)


def test_timestep_changes_the_output():
    cfg = tiny()
    model = perturbed(UNet(cfg)).eval()
    x, _, _, _ = inputs(cfg)
    assert not torch.allclose(model(x, 10), model(x, 900), atol=1e-4)


def test_each_row_of_a_batch_is_independent_of_the_others():
    cfg = tiny(context_dim=12, pooled_dim=7, attention_resolutions=(16, 8))
    model = perturbed(UNet(cfg)).eval()
    x, t, context, pooled = inputs(cfg, batch=4)
    with torch.no_grad():
        whole = model(x, t, context, pooled)
        for k in range(4):
            row = model(x[k:k + 1], t[k:k + 1], context[k:k + 1], pooled[k:k + 1])
            torch.testing.assert_close(row[0], whole[k], atol=1e-5, rtol=1e-4)


def test_timestep_may_be_an_int_a_float_or_a_tensor():
    cfg = tiny()
    model = perturbed(UNet(cfg)).eval()
    x, _, _, _ = inputs(cfg)
    with torch.no_grad():
        ref = model(x, torch.tensor([250, 250]))
        for t in (250, 250.0, torch.tensor(250), torch.tensor([250.0, 250.0]), torch.tensor([250])):
            torch.testing.assert_close(model(x, t), ref)


def test_timestep_embedding_is_sin_then_cos_of_geometric_frequencies():
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 8)  # half = 4: frequencies 10000**(-i/4)
    freqs = torch.tensor([10000.0 ** (-i / 4) for i in range(4)])
    torch.testing.assert_close(emb[1], torch.cat([torch.sin(3 * freqs), torch.cos(3 * freqs)]))
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert timestep_embedding(torch.tensor([1.0]), 9).shape == (1, 9)


def test_channels_last_gives_the_same_output_as_contiguous():
    cfg = tiny(context_dim=12, attention_resolutions=(16, 8))
    model = perturbed(UNet(cfg)).eval()
    x, t, context, _ = inputs(cfg)
    with torch.no_grad():
        model.memory_format = torch.contiguous_format  # NCHW all the way: the reference
        ref = model(x, t, context)
        model.memory_format = None  # the default: channels-last inside on a CPU
        default = model(x, t, context)
        assert default.is_contiguous()  # handed back in the caller's layout
        torch.testing.assert_close(default, ref, atol=1e-5, rtol=1e-4)
        cl = model.to(memory_format=torch.channels_last)
        out = cl(x.contiguous(memory_format=torch.channels_last), t, context)
        out_from_plain_input = cl(x, t, context)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_from_plain_input, ref, atol=1e-5, rtol=1e-4)
    assert out_from_plain_input.is_contiguous(memory_format=torch.channels_last)


def test_gradients_match_between_channels_last_and_contiguous():
    cfg = tiny(context_dim=12, pooled_dim=7)
    x, t, context, pooled = inputs(cfg)
    reference = perturbed(UNet(cfg)).state_dict()
    grads = []
    for layout in (torch.contiguous_format, None):
        model = UNet(cfg)
        model.load_state_dict(reference)
        model.memory_format = layout
        model(x, t, context, pooled).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for ref, got in zip(*grads):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_wrong_conditioning_is_a_clear_error():
    cfg = tiny(context_dim=12)
    model = UNet(cfg)
    x, t, context, _ = inputs(cfg)
    with pytest.raises(ValueError, match="context must be"):
        model(x, t)
    with pytest.raises(ValueError, match="context must be"):
        model(x, t, context[..., :5])
    with pytest.raises(ValueError, match="no pooled_dim"):
        model(x, t, context, pooled=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.zeros(1, 3, 15, 15), 0, context[:1])


# --- the config ---------------------------------------------------------------------------


def test_config_round_trips_through_json():
    cfg = UNetConfig(base_channels=48, channel_mult=(1, 2, 4), attention_resolutions=(16, 8),
                     context_dim=64, pooled_dim=64, dropout=0.1)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["channel_mult"] == [1, 2, 4]
    assert UNetConfig.from_dict(d) == cfg


def test_from_dict_fills_missing_keys_with_defaults():
    assert UNetConfig.from_dict({"base_channels": 32}) == UNetConfig(base_channels=32)


def test_from_dict_rejects_unknown_keys_naming_them():
    with pytest.raises(MinidiffError, match="base_chanels.*num_heads|num_heads.*base_chanels"):
        UNetConfig.from_dict({"base_chanels": 32, "num_heads": 4})


@pytest.mark.parametrize("overrides, words", [
    (dict(image_size=0), "image_size must be a positive integer"),
    (dict(base_channels=-8), "base_channels must be a positive integer"),
    (dict(num_res_blocks=0), "num_res_blocks must be a positive integer"),
    (dict(image_size=32.0), "image_size must be a positive integer"),
    (dict(context_dim=0), "context_dim must be a positive integer"),
    (dict(channel_mult=()), "at least one level"),
    (dict(channel_mult=(1, 0)), "channel_mult must be a list of positive integers"),
    (dict(dropout=1.0), "dropout must be a number in"),
    (dict(image_size=30), "image_size 30 must be divisible by 4.*try 32"),
    (dict(image_size=8, channel_mult=(1,) * 5), "image_size 8 must be divisible by 16"),
    (dict(base_channels=12), "12 channels .* norm_groups 8"),
    (dict(attention_resolutions=(7,)), "attention_resolutions asks for 7 .* 32, 16, 8"),
    (dict(context_dim=16, cross_attention_resolutions=(4,)), "cross_attention_resolutions asks for 4"),
    (dict(head_dim=48), "256 channels at 8x8 .* head_dim 48"),
    (dict(image_size=2048, channel_mult=(1,)), "image_size 2048 is too large"),
    (dict(base_channels=4096), "parameters, more than the 500M allowed"),
])
def test_validate_refuses_bad_configs_in_one_line(overrides, words):
    cfg = UNetConfig(**{"channel_mult": (1, 2, 4), **overrides})
    with pytest.raises(MinidiffError, match=words) as err:
        cfg.validate()
    assert "\n" not in str(err.value)


def test_cross_attention_sizes_are_ignored_without_a_context():
    UNetConfig(cross_attention_resolutions=(3,)).validate()


def test_absurd_model_is_refused_fast_before_any_layer_is_built(monkeypatch):
    def no_layers(*args, **kwargs):
        raise AssertionError("a layer was built for a config that should have been refused")

    monkeypatch.setattr(torch.nn.Conv2d, "__init__", no_layers)
    monkeypatch.setattr(torch.nn.Linear, "__init__", no_layers)
    cfg = UNetConfig(base_channels=10_000, num_res_blocks=1_000_000_000)
    start = time.perf_counter()
    with pytest.raises(MinidiffError, match="parameters"):
        UNet(cfg)
    assert time.perf_counter() - start < 0.5


def test_largest_allowed_model_is_just_under_the_limit():
    # Parameters grow with base_channels squared: the limit falls between these two widths.
    assert UNetConfig(base_channels=512).num_parameters() < 500_000_000
    with pytest.raises(MinidiffError):
        UNetConfig(base_channels=1024).validate()


# --- devices ------------------------------------------------------------------------------


def _runs_like_cpu(device):
    cfg = tiny(context_dim=12, pooled_dim=7)
    model = perturbed(UNet(cfg)).eval()
    x, t, context, pooled = inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, context, pooled)
        moved = model.to(device)
        out = moved(x.to(device), t.to(device), context.to(device), pooled.to(device))
    torch.testing.assert_close(out.cpu(), ref, atol=1e-3, rtol=1e-3)
    moved.train()
    moved(x.to(device), t.to(device), context.to(device), pooled.to(device)).square().mean().backward()
    assert all(p.grad is not None and p.grad.device.type == device for p in moved.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_like_on_cpu():
    _runs_like_cpu("cuda")


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs Apple MPS")
def test_runs_on_mps_like_on_cpu():
    _runs_like_cpu("mps")


# --- a batch's activations --------------------------------------------------------------
@pytest.mark.hostile
def test_activations_are_bounded_at_the_batch_chosen(tmp_path):
    """A model fine for one image (0.5 GiB of attention) is refused for a batch that needs over 64 GiB."""
    from minidiff_cli.diffusion.model import DiffusionModel

    config = json.loads(json.dumps(tiny_config("class")))
    config["unet"].update(image_size=64, base_channels=8, channel_mult=[1], attention_resolutions=[64], head_dim=1,
                          mid_attention=False)
    path = tmp_path / "wide-attention.safetensors"
    DiffusionModel.build(config).save(path)
    assert_error(timed_cli("generate", CLASS_NAMES[0], "--model", path, "-n", "200", "--batch-size", "200", "--quiet",
                           "-o", tmp_path / "out"), "GiB of activations for 200 images")
    assert not (tmp_path / "out").exists()
