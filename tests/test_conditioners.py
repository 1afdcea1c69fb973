"""The conditioners: none, class and clip, and the Conditioning they return."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from minidiff_cli import plugins
from minidiff_cli.diffusion.conditioning import Conditioning
from minidiff_cli.errors import MinidiffError, ModelFileError

CLASSES = ["red circle", "blue square", "green triangle"]
# A CLIP text tower built in well under a second (the vocabulary is the tokenizer's).
TINY_TEXT = {"embed_dim": 8, "quick_gelu": False,
             "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


def conditioner(name, **opts):
    return plugins.get_conditioner(name).from_options(**opts)


def seeded(module, seed=0):
    """Give every floating tensor seeded random values, so outputs differ between inputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.state_dict().values():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


@pytest.fixture(scope="module")
def tiny_clip():
    return seeded(plugins.get_conditioner("clip").from_config(TINY_TEXT))


# -- Conditioning ------------------------------------------------------------------
def test_cat_stacks_the_batch_for_guidance():
    a = Conditioning(torch.zeros(2, 3, 4), torch.zeros(2, 4))
    b = Conditioning(torch.ones(1, 3, 4), torch.ones(1, 4))
    both = Conditioning.cat(a, b)
    assert both.context.shape == (3, 3, 4) and both.pooled.shape == (3, 4)
    assert both.pooled[2].eq(1).all() and both.batch_size == 3


def test_cat_of_empty_conditionings_is_empty():
    assert Conditioning.cat(Conditioning(), Conditioning()).is_empty


def test_cat_refuses_to_mix_with_and_without_a_field():
    with pytest.raises(ValueError):
        Conditioning.cat(Conditioning(pooled=torch.zeros(1, 2)), Conditioning())


def test_where_picks_rows_like_torch_where_and_broadcasts_one_null_row():
    cond = Conditioning(pooled=torch.arange(6.0).view(3, 2))
    null = Conditioning(pooled=torch.full((1, 2), -1.0))
    mixed = cond.where(torch.tensor([True, False, True]), null)
    assert mixed.pooled.tolist() == [[0, 1], [-1, -1], [4, 5]]


def test_repeat_interleave_index_and_to():
    cond = Conditioning(torch.arange(2.0).view(2, 1, 1), torch.arange(2.0).view(2, 1))
    assert cond.repeat_interleave(2).pooled.flatten().tolist() == [0, 0, 1, 1]
    assert cond[1].pooled.tolist() == [[1.0]] and cond[-1].batch_size == 1
    assert cond.to("cpu", torch.float64).context.dtype == torch.float64
    assert cond[0].expand(3).pooled.shape == (3, 1)


def test_conditioning_checks_shapes():
    with pytest.raises(ValueError):
        Conditioning(pooled=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError):
        Conditioning(torch.zeros(2, 3, 4), torch.zeros(3, 4))


# -- registration ------------------------------------------------------------------
def test_builtin_conditioners_are_registered():
    assert {"none", "class", "clip"} <= set(plugins.registry().names("conditioners"))


def test_registering_the_conditioners_imports_neither_torch_nor_open_clip():
    code = ("import sys; from minidiff_cli import plugins; c = plugins.get_conditioner('clip'); "
            "assert c.name == 'clip'; plugins.registry().names('conditioners'); "
            "print('torch' in sys.modules, 'open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_the_lazy_class_forwards_to_the_real_class():
    lazy = plugins.get_conditioner("class")
    made = lazy.from_options(class_names=CLASSES, dim=4)
    assert isinstance(made, lazy) and type(made).__name__ == "ClassConditioner"
    assert lazy.resolve() is type(made) and lazy.trainable is True


# -- none --------------------------------------------------------------------------
def test_none_gives_the_empty_conditioning_for_any_prompt():
    none = conditioner("none")
    assert none.encode(["a red circle", "anything"]).is_empty and none.null(3).is_empty
    assert none.context_dim is None and none.pooled_dim is None and not none.trainable
    assert type(none).from_config(none.config()).state_dict() == {}


def test_an_unknown_option_is_a_one_line_error():
    with pytest.raises(MinidiffError, match="has no option 'dim'"):
        conditioner("none", dim=3)


# -- class -------------------------------------------------------------------------
def test_class_encodes_prompts_to_pooled_embeddings():
    cls = conditioner("class", class_names=CLASSES, dim=5)
    cond = cls.encode(["red circle", "blue square"])
    assert cond.context is None and cond.pooled.shape == (2, 5)
    assert cls.pooled_dim == 5 and cls.context_dim is None and cls.trainable


def test_class_matching_ignores_case_spacing_punctuation_and_article():
    cls = conditioner("class", class_names=CLASSES, dim=5)
    want = cls.encode(["red circle"]).pooled
    for prompt in ("A Red_Circle.", "  red   circle ", "the red-circle"):
        assert torch.equal(cls.encode([prompt]).pooled, want)


def test_class_null_is_its_own_row_and_the_empty_prompt():
    cls = conditioner("class", class_names=CLASSES, dim=5)
    null = cls.null(2).pooled
    assert null.shape == (2, 5) and torch.equal(null[0], null[1])
    assert torch.equal(cls.encode([""]).pooled[0], null[0])
    assert not torch.equal(cls.encode(["red circle"]).pooled[0], null[0])
    assert torch.equal(cls.encode_labels(torch.tensor([3])).pooled, null[:1])


def test_class_unknown_prompt_error_lists_the_class_names():
    cls = conditioner("class", class_names=CLASSES, dim=5)
    with pytest.raises(MinidiffError) as err:
        cls.encode(["purple star"])
    message = str(err.value)
    assert "\n" not in message and "'purple star'" in message
    assert all(name in message for name in CLASSES)


def test_class_label_out_of_range_is_an_error():
    cls = conditioner("class", class_names=CLASSES, dim=5)
    with pytest.raises(MinidiffError, match="out of range"):
        cls.encode_labels(torch.tensor([4]))


def test_class_needs_class_names():
    with pytest.raises(MinidiffError, match="class names"):
        conditioner("class", class_names=[])


def test_class_round_trips_through_config_and_state_dict():
    cls = conditioner("class", class_names=CLASSES, dim=5)
    config = json.loads(json.dumps(cls.config()))
    assert config == {"class_names": CLASSES, "dim": 5}
    again = plugins.get_conditioner("class").from_config(config)
    again.load_state_dict(cls.state_dict(), strict=True)
    assert torch.equal(again.encode(CLASSES).pooled, cls.encode(CLASSES).pooled)


def test_class_gradients_flow_for_joint_training():
    cls = conditioner("class", class_names=CLASSES, dim=5)
    keep = torch.tensor([True, False])
    cond = cls.encode(["red circle", "blue square"]).where(keep, cls.null(2))
    cond.pooled.sum().backward()
    grad = cls.embedding.weight.grad
    assert grad[0].abs().sum() > 0 and grad[3].abs().sum() > 0 and grad[1].abs().sum() == 0


# -- clip --------------------------------------------------------------------------
def test_clip_gives_token_states_and_pooled_vector(tiny_clip):
    cond = tiny_clip.encode(["a red circle", "a blue square"])
    assert cond.context.shape == (2, 8, 16) and cond.pooled.shape == (2, 8)
    assert tiny_clip.context_dim == 16 and tiny_clip.pooled_dim == 8


def test_clip_is_deterministic_and_distinguishes_prompts(tiny_clip):
    first = tiny_clip.encode(["a red circle", "a blue square"])
    tiny_clip._cache.clear()
    second = tiny_clip.encode(["a red circle", "a blue square"])
    assert torch.equal(first.context, second.context) and torch.equal(first.pooled, second.pooled)
    assert not torch.allclose(first.pooled[0], first.pooled[1])


def test_clip_null_is_the_empty_prompt_and_differs_from_a_prompt(tiny_clip):
    null = tiny_clip.null(3)
    assert null.context.shape == (3, 8, 16)
    assert torch.equal(null.pooled[2], tiny_clip.encode([""]).pooled[0])
    assert not torch.allclose(null.pooled[0], tiny_clip.encode(["a red circle"]).pooled[0])


def test_clip_is_frozen_even_when_asked_to_train(tiny_clip):
    tiny_clip.train()
    assert not tiny_clip.training and not any(m.training for m in tiny_clip.modules())
    assert not any(p.requires_grad for p in tiny_clip.parameters())
    assert tiny_clip.trainable is False and tiny_clip.storage_dtype == "float16"


def test_clip_cache_is_bounded_and_safe_outside_inference_mode():
    clip = seeded(plugins.get_conditioner("clip").from_config(TINY_TEXT))
    clip.cache_size = 2
    with torch.inference_mode():
        clip.encode(["a", "b", "c"])
    assert list(clip._cache) == ["b", "c"]
    # A row cached under inference mode must still be usable by code that records gradients.
    weight = torch.ones(8, requires_grad=True)
    (clip.encode(["c"]).pooled * weight).sum().backward()
    assert weight.grad is not None


def test_clip_matches_open_clips_own_text_transformer(tiny_clip):
    """Same names, same numbers: open_clip's TextTransformer loads our state dict as is."""
    from open_clip.model import _build_text_tower

    reference = _build_text_tower(TINY_TEXT["embed_dim"], {**TINY_TEXT["text_cfg"], "output_tokens": True})
    reference.load_state_dict(tiny_clip.state_dict(), strict=True)
    prompts = ["a red circle", "", "a small green triangle on a navy background"]
    pooled, tokens = reference(tiny_clip.tokenize(prompts))
    cond = tiny_clip.encode(prompts)
    assert torch.allclose(cond.pooled, pooled, atol=1e-6) and torch.allclose(cond.context, tokens, atol=1e-6)


# Text towers that minidiff lays out itself (TextTower), each checked against open_clip's builder.
TOWER_VARIANTS = {
    "default": {},
    "quick gelu": {"quick_gelu": True},
    "layer scale and wider mlp": {"ls_init_value": 0.5, "mlp_ratio": 2.0},
    "projection with bias": {"proj_bias": True},
    "no projection": {"proj_type": "none"},
    "bidirectional, eos pooling": {"no_causal_mask": True, "pool_type": "eos", "eos_id": 49407},
    "first-token pooling, norm eps, tanh gelu": {"pool_type": "first", "norm_kwargs": {"eps": 1e-6},
                                                 "act_kwargs": {"approximate": "tanh"}},
}


@pytest.mark.parametrize("variant", list(TOWER_VARIANTS))
def test_clip_text_tower_is_open_clips_name_for_name_and_number_for_number(variant):
    from open_clip.model import _build_text_tower

    from minidiff_cli.clip.text_tower import TextTower

    options = dict(TOWER_VARIANTS[variant])
    quick_gelu = options.pop("quick_gelu", False)
    text_cfg = {**TINY_TEXT["text_cfg"], **options}
    clip = seeded(plugins.get_conditioner("clip").from_config(
        {"embed_dim": TINY_TEXT["embed_dim"], "text_cfg": text_cfg, "quick_gelu": quick_gelu}))
    assert isinstance(clip.transformer.resblocks[0], torch.nn.Module)
    reference = _build_text_tower(TINY_TEXT["embed_dim"], {**text_cfg, "output_tokens": True}, quick_gelu=quick_gelu)
    ours = TextTower(TINY_TEXT["embed_dim"], quick_gelu=quick_gelu, **text_cfg)
    theirs = {k: (tuple(v.shape), v.dtype) for k, v in reference.state_dict().items()}
    assert {k: (tuple(v.shape), v.dtype) for k, v in ours.state_dict().items()} == theirs
    assert [type(m).__name__ for m in ours.modules()][1:] == [type(m).__name__ for m in reference.modules()][1:]
    reference.load_state_dict(clip.state_dict(), strict=True)
    reference.eval().requires_grad_(False)
    prompts = ["a red circle", "", "a small green triangle on a navy background"]
    with torch.no_grad():
        pooled, tokens = reference(clip.tokenize(prompts))
    cond = clip.encode(prompts)
    assert torch.equal(cond.pooled, pooled) and torch.equal(cond.context, tokens)


def test_a_custom_attention_block_is_built_by_open_clip_itself():
    clip = plugins.get_conditioner("clip").from_config(
        {"embed_dim": 8, "text_cfg": {**TINY_TEXT["text_cfg"], "qk_norm": True}})
    assert type(clip.transformer.resblocks[0]).__module__ == "open_clip.transformer"


def test_clip_tokenizer_is_open_clips_own():
    import open_clip

    from minidiff_cli.clip.tokenizer import tokenizer_for

    prompts = ["a red circle", "", "A Purple TRIANGLE, on blue!", "naïve café " * 20]
    ours = tokenizer_for({"context_length": 77})(prompts)
    assert torch.equal(ours, open_clip.tokenize(prompts))


def test_encoding_a_prompt_imports_neither_open_clips_package_nor_torchvision():
    code = ("import sys; from minidiff_cli import plugins; "
            f"c = plugins.get_conditioner('clip').from_config({TINY_TEXT!r}); c.encode(['a red circle']); "
            "print(' '.join(str(m in sys.modules) for m in ('open_clip', 'torchvision', 'timm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False"]


def test_clip_round_trips_through_config_and_a_half_precision_state_dict(tiny_clip):
    config = json.loads(json.dumps(tiny_clip.config()))
    again = plugins.get_conditioner("clip").from_config(config)
    again.load_state_dict({k: v.half() for k, v in tiny_clip.state_dict().items()}, strict=True)
    assert next(again.parameters()).dtype == torch.float32
    a, b = again.encode(["a red circle"]), tiny_clip.encode(["a red circle"])
    assert torch.allclose(a.pooled, b.pooled, atol=1e-2) and torch.allclose(a.context, b.context, atol=1e-2)


def tiny_open_clip(seed=0):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(TINY_TEXT["embed_dim"], text_cfg=TINY_TEXT["text_cfg"],
                          vision_cfg={"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8})


def reference_pooled(model, tokens):
    """open_clip's own CLIP.encode_text, in the conditioner's mode: eval, frozen, no grad.

    (Frozen matters for bitwise equality: torch picks another attention kernel.)
    """
    with torch.no_grad():
        return model.eval().requires_grad_(False).encode_text(tokens)


def test_clip_loads_a_local_safetensors_file_with_its_config(tmp_path, tiny_clip):
    model = tiny_open_clip()
    path = tmp_path / "clip.safetensors"
    save_file(model.state_dict(), str(path),
              metadata={"format": "minidiff-clip", "format_version": "1", "config": json.dumps(TINY_TEXT)})
    clip = conditioner("clip", weights=str(path))
    prompts = ["a red circle", "a blue square"]
    assert torch.equal(clip.encode(prompts).pooled, reference_pooled(model, clip.tokenize(prompts)))


def test_clip_loads_a_plain_safetensors_file_given_its_config(tmp_path):
    model = tiny_open_clip(seed=1)
    path = tmp_path / "text.safetensors"
    text_only = {k: v for k, v in model.state_dict().items() if not k.startswith(("visual.", "logit"))}
    save_file(text_only, str(path))
    with pytest.raises(MinidiffError, match="does not say which text model"):
        conditioner("clip", weights=str(path))
    clip = conditioner("clip", weights=str(path), config=json.dumps(TINY_TEXT))
    tokens = clip.tokenize(["a red circle"])
    assert torch.equal(clip.encode(["a red circle"]).pooled, model.encode_text(tokens).detach())


def test_clip_refuses_weights_of_another_shape(tmp_path):
    model = tiny_open_clip()
    path = tmp_path / "clip.safetensors"
    save_file(model.state_dict(), str(path))
    bigger = {**TINY_TEXT, "text_cfg": {**TINY_TEXT["text_cfg"], "layers": 2}}
    with pytest.raises(ModelFileError, match="missing 'transformer.resblocks.1"):
        conditioner("clip", weights=str(path), config=bigger)


def test_clip_loads_an_open_clip_architecture_with_a_local_pretrained_file(tmp_path):
    import open_clip

    arch = "minidiff-tiny-test"
    (tmp_path / f"{arch}.json").write_text(json.dumps(
        {"embed_dim": 8, "text_cfg": TINY_TEXT["text_cfg"],
         "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8}}))
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    model = tiny_open_clip(seed=2)
    path = tmp_path / "pretrained.safetensors"
    save_file({f"module.{k}": v for k, v in model.state_dict().items()}, str(path))  # as saved under DDP
    clip = conditioner("clip", arch=arch, pretrained=str(path))
    assert clip.config()["text_cfg"] == TINY_TEXT["text_cfg"]
    tokens = clip.tokenize(["a red circle"])
    assert torch.equal(clip.encode(["a red circle"]).pooled, model.encode_text(tokens).detach())


def test_an_uncached_pretrained_tag_fails_fast_with_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import open_clip  # noqa: F401  (the import is slow; it is not what is timed)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(MinidiffError) as err:
        conditioner("clip", arch="ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert time.perf_counter() - start < 5
    assert str(err.value) == ("pretrained weights 'laion2b_s34b_b79k' for 'ViT-B-32' are not cached and cannot "
                              "be downloaded here; pass a local weights file with --clip-weights")
    with pytest.raises(MinidiffError, match="'hf-hub:laion/nothing-here' is not cached"):
        conditioner("clip", arch="hf-hub:laion/nothing-here")
    assert time.perf_counter() - start < 5


def test_a_cached_hub_tag_is_found_without_the_network(tmp_path, monkeypatch):
    """The Hugging Face cache layout: models--ORG--NAME/snapshots/REV/FILE and refs/main."""
    import huggingface_hub.constants
    import open_clip

    from minidiff_cli.clip.weights import cached_pretrained_file

    repo = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")["hf_hub"].startswith(repo)
    folder = tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / "open_clip_model.safetensors").write_bytes(b"x")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    found = cached_pretrained_file("ViT-B-32", "laion2b_s34b_b79k")
    assert found.name == "open_clip_model.safetensors" and "abc123" in str(found)


def test_unknown_arch_and_tag_are_one_line_errors():
    with pytest.raises(MinidiffError, match="no architecture 'ViT-Q-99'"):
        conditioner("clip", arch="ViT-Q-99", pretrained="openai")
    with pytest.raises(MinidiffError, match="no pretrained weights 'nope' for 'ViT-B-32'.*its tags: openai"):
        conditioner("clip", arch="ViT-B-32", pretrained="nope")
    with pytest.raises(MinidiffError, match="needs weights"):
        conditioner("clip")


class _Boom:
    """Unpickling this writes a file: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_a_pickle_file_is_refused_and_never_unpickled(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"weights{suffix}"
    torch.save({"token_embedding.weight": torch.zeros(2, 2), "boom": _Boom(str(marker))}, path)
    with pytest.raises(ModelFileError, match="pickle") as err:
        conditioner("clip", weights=str(path), config=TINY_TEXT)
    assert "\n" not in str(err.value) and not marker.exists()
    legacy = tmp_path / f"legacy{suffix}"
    legacy.write_bytes(pickle.dumps(_Boom(str(marker)), protocol=2))
    with pytest.raises(ModelFileError, match="pickle"):
        conditioner("clip", arch="ViT-B-32", pretrained=str(legacy))
    assert not marker.exists()


def test_a_bin_file_that_is_neither_is_refused_saying_so(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(64))
    with pytest.raises(ModelFileError, match="not a safetensors file; .bin files are usually pickles"):
        conditioner("clip", weights=str(path), config=TINY_TEXT)


def test_a_bin_file_that_is_safetensors_is_accepted(tmp_path):
    model = tiny_open_clip()
    path = tmp_path / "open_clip_pytorch_model.bin"
    save_file(model.state_dict(), str(path))
    clip = conditioner("clip", weights=str(path), config=TINY_TEXT)
    assert clip.encode(["x"]).pooled.shape == (1, 8)


def test_a_safetensors_file_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """The first byte of a safetensors file is the low byte of its header length: it can be 0x80."""
    state = tiny_open_clip().state_dict()
    path = tmp_path / "clip.safetensors"
    for pad in range(300):
        save_file(state, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert conditioner("clip", weights=str(path), config=TINY_TEXT).encode(["x"]).pooled.shape == (1, 8)
