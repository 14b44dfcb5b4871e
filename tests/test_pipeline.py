"""Whole-pipeline parity with diffusers 0.42.1: same components, seeds and inputs -> same images.

Each test builds one tiny random diffusers pipeline, converts its weights into ours, runs both at a
non-square size and compares decoded images in [0, 1] (fp32). Tolerance 1e-4: differences come from
summation order only (fused qkv, separate reference K/V pass).
"""

import dataclasses
import os

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinKVPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
)
from PIL import Image

from flux2studio import sampling
from flux2studio.layouts.transformer import transformer_from_diffusers
from flux2studio.layouts.vae import vae_from_diffusers
from flux2studio.model.autoencoder import AutoEncoder
from flux2studio.model.transformer import Flux2Transformer
from flux2studio.pipeline import Component, Pipeline, build_request
from flux2studio.settings import GenerationSettings
from flux2studio.text_encoders import TextEncoder
from flux2studio.variants import get_variant
from tiny import (
    MISTRAL_SPEC,
    MISTRAL_TEMPLATE,
    QWEN3_SPEC,
    QWEN3_TEMPLATE,
    TRANSFORMER,
    diffusers_transformer,
    diffusers_vae,
    mistral3,
    qwen3,
    randomize_,
    tokenizer,
)

TOL = 1e-4
VAE = dataclasses.replace(get_variant("nano").vae, channels=(32, 32, 32, 32))  # 4 levels: 8x down


def _scheduler():  # the scheduler config shipped with the FLUX.2 checkpoints
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", shift=3.0)


def _ours(variant_id: str, dpipe, spec, model_fn) -> Pipeline:
    t_cfg = dataclasses.replace(TRANSFORMER, guidance_embed=dpipe.transformer.config.guidance_embeds)
    variant = dataclasses.replace(get_variant(variant_id), transformer=t_cfg, vae=VAE, text_encoder=spec)
    transformer = Flux2Transformer(t_cfg)
    transformer.load_state_dict(transformer_from_diffusers(dpipe.transformer.state_dict()))
    vae = AutoEncoder(VAE)
    vae.load_state_dict(vae_from_diffusers(dpipe.vae.state_dict(), VAE))
    text_encoder = TextEncoder(spec, model_fn(), dpipe.tokenizer)  # a fresh copy of the same weights
    return Pipeline(variant, transformer, vae, text_encoder)


def _refs():
    g = torch.Generator().manual_seed(7)
    a = (torch.rand(80, 112, 3, generator=g) * 255).to(torch.uint8).numpy()
    b = (torch.rand(70, 64, 3, generator=g) * 255).to(torch.uint8).numpy()  # cropped to 64x64
    return [Image.fromarray(a), Image.fromarray(b)]


def _ours_images(pipe: Pipeline, prompts, **kw) -> torch.Tensor:
    req = build_request(pipe.variant, prompts, **kw)
    with torch.no_grad():
        return (pipe.decode(pipe.generate_latents(req)) / 2 + 0.5).clamp(0, 1)


def _gens(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _klein(is_distilled: bool, kv: bool = False):
    cls = Flux2KleinKVPipeline if kv else Flux2KleinPipeline
    transformer = diffusers_transformer(dataclasses.replace(TRANSFORMER, guidance_embed=False))
    return cls(
        scheduler=_scheduler(),
        vae=diffusers_vae(VAE),
        text_encoder=qwen3(),
        tokenizer=tokenizer(QWEN3_TEMPLATE),
        transformer=transformer,
        is_distilled=is_distilled,
    )


def test_klein_distilled_with_two_references_matches_diffusers():
    dpipe = _klein(is_distilled=True)
    ours = _ours("klein-4b", dpipe, QWEN3_SPEC, qwen3)
    prompts = ["a red circle", "a blue square on a white background"]
    with torch.no_grad():
        expected = dpipe(
            image=_refs(), prompt=prompts, width=96, height=64, num_inference_steps=3,
            num_images_per_prompt=2, generator=_gens([5, 6, 7, 8]), output_type="pt",
            max_sequence_length=QWEN3_SPEC.max_length, text_encoder_out_layers=QWEN3_SPEC.layers,
        ).images  # fmt: skip
    got = _ours_images(ours, prompts, size=(96, 64), steps=3, num_images=2, seed=5, refs=_refs())
    assert got.shape == expected.shape == (4, 3, 64, 96)
    assert (got - expected).abs().max().item() <= TOL


def test_klein_base_cfg_with_negative_prompt_matches_diffusers():
    dpipe = _klein(is_distilled=False)
    ours = _ours("klein-base-4b", dpipe, QWEN3_SPEC, qwen3)
    negative = "blurry, low quality"
    kw = dict(max_sequence_length=QWEN3_SPEC.max_length, text_encoder_out_layers=QWEN3_SPEC.layers)
    with torch.no_grad():
        neg_embeds, _ = dpipe.encode_prompt(negative, device="cpu", **kw)
        expected = dpipe(
            prompt="a green triangle", width=64, height=112, num_inference_steps=4, guidance_scale=3.5,
            negative_prompt_embeds=neg_embeds, generator=_gens([11]), output_type="pt", **kw,
        ).images  # fmt: skip
    got = _ours_images(ours, "a green triangle", size=(64, 112), steps=4, guidance=3.5, seed=11,
                       negative_prompt=negative)  # fmt: skip
    assert (got - expected).abs().max().item() <= TOL


def test_klein_kv_with_references_matches_diffusers():
    dpipe = _klein(is_distilled=True, kv=True)
    ours = _ours("klein-9b-kv", dpipe, QWEN3_SPEC, qwen3)
    with torch.no_grad():
        expected = dpipe(
            image=_refs(), prompt="make it blue", width=64, height=96, num_inference_steps=3,
            generator=_gens([3]), output_type="pt",
            max_sequence_length=QWEN3_SPEC.max_length, text_encoder_out_layers=QWEN3_SPEC.layers,
        ).images  # fmt: skip
    got = _ours_images(ours, "make it blue", size=(64, 96), steps=3, seed=3, refs=_refs())
    assert (got - expected).abs().max().item() <= TOL


def test_dev_with_embedded_guidance_and_references_matches_diffusers():
    dpipe = Flux2Pipeline(
        scheduler=_scheduler(),
        vae=diffusers_vae(VAE),
        text_encoder=mistral3(),
        tokenizer=tokenizer(MISTRAL_TEMPLATE),
        transformer=diffusers_transformer(dataclasses.replace(TRANSFORMER, guidance_embed=True)),
    )
    dpipe.system_message = MISTRAL_SPEC.system_message
    ours = _ours("dev", dpipe, MISTRAL_SPEC, mistral3)
    with torch.no_grad():
        expected = dpipe(
            image=_refs(), prompt="a cat holding a sign", width=80, height=64, num_inference_steps=3,
            guidance_scale=2.5, generator=_gens([42]), output_type="pt",
            max_sequence_length=MISTRAL_SPEC.max_length, text_encoder_out_layers=MISTRAL_SPEC.layers,
        ).images  # fmt: skip
    got = _ours_images(ours, "a cat holding a sign", size=(80, 64), steps=3, guidance=2.5, seed=42,
                       refs=_refs())  # fmt: skip
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("variant_id,dtype", [("klein-base-4b", torch.float32), ("klein-base-4b", torch.bfloat16),
                                              ("klein-9b-kv", torch.float32), ("dev", torch.float32)])  # fmt: skip
def test_image_i_of_a_batch_is_its_seed_alone_bit_for_bit(variant_id, dtype):
    """`--from` remakes image i of a `--num 4` call alone, and the server batches different jobs into one call: an
    image's pixels must not depend on the batch it was made in. Through CFG, references (joint and cached), embedded
    guidance, both text encoders, fp32 and bf16: image i of a batch is bit for bit its prompt and seed alone."""
    spec, model_fn, template = (MISTRAL_SPEC, mistral3, MISTRAL_TEMPLATE) if variant_id == "dev" else \
        (QWEN3_SPEC, qwen3, QWEN3_TEMPLATE)  # fmt: skip
    t_cfg = dataclasses.replace(TRANSFORMER, guidance_embed=variant_id == "dev")
    variant = dataclasses.replace(get_variant(variant_id), transformer=t_cfg, vae=VAE, text_encoder=spec)
    parts = randomize_(Flux2Transformer(t_cfg), std=0.05), randomize_(AutoEncoder(VAE), std=0.05)
    pipe = Pipeline(variant, *parts, TextEncoder(spec, model_fn(), tokenizer(template)), dtype=dtype)
    pipe.prompt_cache.limit = 0  # each prompt encoded alone again, not taken from the batch's call
    prompts = ["a red circle", "a blue square on a white background"]
    kw = dict(size=(80, 64), steps=2, refs=_refs()[:1], **({"negative_prompt": "blurry"} if variant.uses_cfg else {}))
    batch = pipe(prompts, num_images=2, seed=5, **kw)
    assert len(batch) == 4
    for i, image in enumerate(batch):
        alone = pipe(prompts[i // 2], seed=5 + i, **kw)[0]
        assert image.tobytes() == alone.tobytes(), i


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_nano_image_i_of_a_batch_is_its_seed_alone_bit_for_bit(quantize):
    """The embedded model as loaded by default (`auto` dtype), and with its weights packed: the same."""
    from flux2studio import load

    pipe = load("nano", quantize=quantize)
    pipe.prompt_cache.limit = 0
    batch = pipe("a red circle above a blue square", num_images=3, seed=5)
    for i, image in enumerate(batch):
        assert image.tobytes() == pipe("a red circle above a blue square", seed=5 + i)[0].tobytes(), i


def _cfg_pipeline(loads: list[int] | None = None) -> Pipeline:
    """klein Base on tiny random parts (seeded: two are the same model), its text encoder loaded on demand."""
    torch.manual_seed(0)
    t_cfg = dataclasses.replace(TRANSFORMER, guidance_embed=False)
    variant = dataclasses.replace(get_variant("klein-base-4b"), transformer=t_cfg, vae=VAE, text_encoder=QWEN3_SPEC)
    parts = randomize_(Flux2Transformer(t_cfg), std=0.05), randomize_(AutoEncoder(VAE), std=0.05)
    model = qwen3()

    def text_encoder() -> TextEncoder:
        if loads is not None:
            loads.append(1)
        return TextEncoder(QWEN3_SPEC, model, tokenizer(QWEN3_TEMPLATE))

    return Pipeline(variant, *parts, Component(text_encoder))


def test_prompts_seen_in_recent_calls_skip_the_text_encoder(monkeypatch):
    """A prompt (or the negative prompt) of a recent call is not encoded again, and when every one was seen the
    text encoder is not even loaded; the images are those of a pipeline that encodes everything. The cache is
    bounded in bytes, the least recently used leaving first; a limit of 0 keeps none."""
    encoded: list[list[str]] = []
    original = TextEncoder.__call__
    monkeypatch.setattr(
        TextEncoder, "__call__", lambda self, p, dtype=None: encoded.append(p) or original(self, p, dtype)
    )
    loads: list[int] = []
    pipe, plain = _cfg_pipeline(loads), _cfg_pipeline()
    plain.prompt_cache.limit = 0
    kw = dict(size=(64, 64), steps=2, negative_prompt="blurry")

    def same(prompts: list[str], seed: int) -> bool:
        return [im.tobytes() for im in pipe(prompts, seed=seed, **kw)] == [
            im.tobytes() for im in plain(prompts, seed=seed, **kw)
        ]

    assert same(["a red circle", "a blue square"], 1)
    assert encoded[0] == ["a red circle", "a blue square"] and encoded[1] == ["blurry"] and len(loads) == 1
    encoded.clear()
    assert same(["a blue square"], 2)
    assert encoded == [["a blue square"], ["blurry"]] and len(loads) == 1  # only the plain pipeline encoded
    encoded.clear()
    assert same(["a blue square", "a green triangle"], 3)
    assert encoded[0] == ["a green triangle"] and len(loads) == 2  # the new prompt alone
    one = pipe.prompt_cache.nbytes // len(pipe.prompt_cache)
    pipe.prompt_cache.limit = 2 * one  # the two used last are kept: "a green triangle", then "blurry"
    pipe(["a yellow circle"], seed=4, **kw)  # in, and "a green triangle" out
    kept = [p for p in ("a red circle", "a blue square", "a green triangle", "a yellow circle", "blurry")
            if pipe.prompt_cache.get((p, pipe.dtype)) is not None]  # fmt: skip
    assert kept == ["a yellow circle", "blurry"]
    pipe.prompt_cache.limit = 0
    assert len(pipe.prompt_cache) == 0
    with pytest.raises(ValueError, match="limit of -1: give bytes, 0"):
        pipe.prompt_cache.limit = -1
    encoded.clear()
    assert same(["a blue square"], 5)
    assert encoded[0] == ["a blue square"] and len(encoded) == 4


def test_images_seen_in_recent_calls_skip_the_vae_encoder(monkeypatch):
    """A reference or start image encoded in a recent call (same pixels, tiles and dtype) is not encoded again; the
    images are those of a pipeline that encodes everything. A limit of 0 keeps none."""
    encoded: list[tuple[int, ...]] = []
    original = AutoEncoder.encode

    def encode(self, x: torch.Tensor, **kw) -> torch.Tensor:
        if x.device.type != "meta":  # not the work memory's trace
            encoded.append(tuple(x.shape))
        return original(self, x, **kw)

    monkeypatch.setattr(AutoEncoder, "encode", encode)
    pipe, plain = _cfg_pipeline(), _cfg_pipeline()
    plain.latent_cache.limit = 0
    ref, start = _refs()
    kw = dict(size=(64, 64), steps=2, refs=[ref])

    def same(prompt: str, seed: int, **more) -> bool:
        ours, theirs = pipe(prompt, seed=seed, **kw, **more), plain(prompt, seed=seed, **kw, **more)
        return [im.tobytes() for im in ours] == [im.tobytes() for im in theirs]

    assert same("a red circle", 1) and len(encoded) == 2  # the reference, by each pipeline
    encoded.clear()
    assert same("a blue square", 2) and len(encoded) == 1  # by the plain one only
    encoded.clear()
    assert same("a blue square", 3, image=start, strength=0.6) and len(encoded) == 3  # the new start image
    encoded.clear()
    assert same("a green triangle", 4, image=start, strength=0.6) and len(encoded) == 2
    pipe.latent_cache.limit = 0
    encoded.clear()
    assert same("a green triangle", 5) and len(encoded) == 2


def test_schedule_matches_diffusers_scheduler_bit_for_bit():
    for steps, seq_len in [(4, 4096), (50, 1024), (28, 6000), (1, 64)]:
        sched = _scheduler()
        mu = sampling.empirical_mu(seq_len, steps)
        import numpy as np

        sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        assert torch.equal(sampling.schedule(steps, seq_len), sched.sigmas)
    sched = _scheduler()  # a model's own shift (nano) goes through the same formula
    sched.set_timesteps(4, sigmas=np.linspace(1.0, 1 / 4, 4), mu=1.0)
    assert torch.equal(sampling.schedule(4, 64, mu=1.0), sched.sigmas)


def test_schedule_example_from_the_spec():
    # FLUX2.md §6: 1024x1024, 4 steps -> 1, 0.967, 0.908, 0.767, 0
    got = sampling.schedule(4, (1024 // 16) ** 2)
    assert torch.allclose(got, torch.tensor([1.0, 0.967, 0.908, 0.767, 0.0]), atol=5e-4)


def test_noise_matches_diffusers_seed_contract():
    from diffusers.utils.torch_utils import randn_tensor

    got = sampling.noise([3, 4], 128, 64, 96, torch.float32)
    expected = randn_tensor((2, 128, 4, 6), generator=_gens([3, 4]), dtype=torch.float32)
    assert torch.equal(got, expected)
    single = randn_tensor((1, 128, 4, 6), generator=torch.Generator("cpu").manual_seed(3))
    assert torch.equal(got[:1], single)  # image 0 of a batch == the same seed alone


def test_denoise_with_a_toy_velocity_reaches_the_target():
    target = torch.full((1, 4, 2), 0.25)
    # Straight path from noise x1 to target: v = x1 - target is constant, so Euler is exact.
    x1 = torch.randn(1, 4, 2)
    out = sampling.denoise(lambda x, t: x1 - target, x1, sampling.schedule(3, 16))
    assert torch.allclose(out, target, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(size=(100, 64)), "width 100 is not a multiple of 16"),
        (dict(size=(64, 4096)), r"height 4096 is outside the supported range 64\.\.2048"),
        (dict(size=(0, 64)), "width must be a positive integer"),
        (dict(steps=0), r"steps 0 is out of range 1\.\.200"),
        (dict(steps=-3), r"steps -3 is out of range"),
        (dict(guidance=3.0), "guidance-distilled and ignores guidance"),
        (dict(negative_prompt="ugly"), "negative prompt has no effect"),
        (dict(num_images=0), "num_images 0 is out of range"),
        (dict(seed=-1), r"seed must be an integer in 0\.\.2\*\*63-1"),
        (dict(seed="abc"), r"seed must be an integer in 0\.\.2\*\*63-1, got 'abc'"),  # (was a TypeError)
        (dict(seed=2**63 - 1, num_images=2), r"seed 9223372036854775807 with 2 images runs past 2\*\*63-1"),
        (dict(steps=True), r"steps True is not a whole number"),  # (passed, then failed in the sampler)
        (dict(size="128x"), r"size '128x' is not WIDTHxHEIGHT"),
        (dict(size=128), r"size 128 is not \(width, height\)"),
        (dict(refs="a.png"), r"refs must be a list of images"),
        (dict(refs=[3]), r"reference 0 must be a PIL image, an image file's path or a uint8 array, got int"),
        (dict(refs=None), r"refs must be a list of images"),  # (was Python's "not iterable")
        (dict(num_images=65), r"1 prompt\(s\) x 65 image\(s\) = 65 images: at most 64 a call"),  # (was "1..64")
        (dict(seeds=[True]), r"seed must be an integer in 0\.\.2\*\*63-1, got True"),  # (torch's RuntimeError)
        (dict(guidance=True), r"guidance must be a number, got True"),  # (was taken as 1.0)
        (dict(prompt_upsampling="no"), r"prompt_upsampling must be True, False or None, got 'no'"),  # (was "yes")
        (dict(image=Image.new("RGB", (64, 64)), expand=16), r"expand 16 is not 4 sides in pixels"),
    ],
)
def test_bad_requests_name_the_value_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_request(get_variant("klein-4b"), "a prompt", **kwargs)


def test_settings_object_and_keywords_are_one_request():
    """`build_request` (and so `Pipeline.__call__`) takes a GenerationSettings, keywords, or both (they change it)."""
    v = get_variant("klein-base-4b")
    saved = GenerationSettings("p", size=(128, 64), steps=3, negative_prompt="blur", num_images=2)
    assert build_request(v, saved) == build_request(
        v, "p", size=(128, 64), steps=3, negative_prompt="blur", num_images=2
    )
    assert build_request(v, saved, seed=7).seeds == (7, 8) and saved.seed == 0
    assert build_request(v, "p", seeds=[9, 2]).seeds == (9, 2)  # one image a seed (was "2 seeds for 1 images")
    with pytest.raises(ValueError, match=r"unknown setting.s. stepz; known: aspect"):
        build_request(v, "p", stepz=3)


def test_sizes_as_text_images_as_paths_and_sixteen_bit_greys(tmp_path):
    """The Python call takes "WxH" and image paths (before: unpack and attribute errors); a 16-bit grey
    reference is its grey, not white (Pillow's RGB conversion clipped it); a negative prompt where no CFG runs
    (guidance 1 on a CFG model) is an error, not silently nothing."""
    v = get_variant("klein-base-4b")
    grey = np.full((64, 64), 32768, dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")  # mode I;16
    req = build_request(v, "p", size="128x64", refs=[tmp_path / "grey16.png"])
    assert (req.width, req.height) == (128, 64) and req.refs[0].getpixel((0, 0)) == (128, 128, 128)
    assert build_request(v, "p", refs=[str(tmp_path / "grey16.png")]).refs == req.refs
    with pytest.raises(ValueError, match="a negative prompt acts only with guidance above 1"):
        build_request(v, "p", guidance=1.0, negative_prompt="blurry")
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone photo held upright: stored 192x128, seen 128x192 (before: used sideways)
    Image.new("RGB", (192, 128), "red").save(tmp_path / "phone.jpg", exif=exif)
    assert build_request(v, "p", refs=[tmp_path / "phone.jpg"]).refs[0].size == (128, 192)


def test_bad_references_and_guidance_are_refused():
    base = get_variant("klein-base-4b")
    with pytest.raises(ValueError, match=r"guidance 0.5 is out of range 1.0\.\.30.0"):
        build_request(base, "p", guidance=0.5)
    tiny = Image.new("RGB", (32, 200))
    with pytest.raises(ValueError, match="reference 0 is 32x200: both sides must be at least 64"):
        build_request(base, "p", refs=[tiny])
    long = Image.new("RGB", (1000, 100))
    with pytest.raises(ValueError, match=r"reference 0 is 1000x100 \(aspect 10.0:1\): at most 8:1"):
        build_request(base, "p", refs=[long])
    five = [Image.new("RGB", (64, 64))] * 5
    with pytest.raises(ValueError, match=r"5 reference images given; klein-base-4b takes 0\.\.4"):
        build_request(base, "p", refs=five)


def test_guidance_interval_guides_only_the_noise_levels_in_it():
    """CFG only at lo <= t <= hi (the conditional velocity alone elsewhere, with no unconditional pass there);
    by default every step is guided (what diffusers does, so parity holds)."""
    calls = []
    cond = lambda x, t: torch.full_like(x, 2.0)  # noqa: E731
    uncond = lambda x, t: calls.append(float(t[0])) or torch.full_like(x, 1.0)  # noqa: E731
    v = sampling.cfg_velocity(cond, uncond, 4.0, (0.2, 0.9))
    x = torch.zeros(2, 3, 4)
    for t, want in ((1.0, 2.0), (0.95, 2.0), (0.9, 5.0), (0.5, 5.0), (0.2, 5.0), (0.1, 2.0)):
        assert torch.equal(v(x, torch.full((2,), t)), torch.full_like(x, want)), t
    assert calls == pytest.approx([0.9, 0.5, 0.2])
    assert sampling.cfg_velocity(cond, uncond, 4.0)(x, torch.ones(2)).eq(5.0).all()  # default: every level

    assert build_request(get_variant("klein-base-4b"), "p").guidance_interval == (0.0, 1.0)
    assert build_request(get_variant("nano-base"), "p", guidance_interval=(0, 0.9)).guidance_interval == (0.0, 0.9)
    with pytest.raises(ValueError, match=r"guidance interval \(0.9, 0.5\) must be noise levels with 0 <= low < high"):
        build_request(get_variant("nano-base"), "p", guidance_interval=(0.9, 0.5))
    with pytest.raises(ValueError, match=r"guidance interval \(0.0, 1.5\)"):
        build_request(get_variant("nano-base"), "p", guidance_interval=(0, 1.5))
    with pytest.raises(ValueError, match=r"guidance interval '0,0.9' is not two noise levels \(low, high\)"):
        build_request(get_variant("nano-base"), "p", guidance_interval="0,0.9")
    with pytest.raises(ValueError, match=r"guidance interval \(0.5,\) is not two noise levels"):
        build_request(get_variant("nano-base"), "p", guidance_interval=(0.5,))
    with pytest.raises(ValueError, match="nano does not run classifier-free guidance, so a guidance interval"):
        build_request(get_variant("nano"), "p", guidance_interval=(0, 0.9))


def test_a_reference_sets_a_size_the_model_takes():
    """Without a size the first reference sets it (as in diffusers), scaled into the model's sides: nano takes
    sides up to 256, so a 1024x768 reference gives 256x192, not an error about a width nobody gave."""
    req = build_request(get_variant("nano"), "a red circle", refs=[Image.new("RGB", (1024, 768))])
    assert (req.width, req.height) == (256, 192)
    klein = build_request(get_variant("klein-4b"), "a red circle", refs=[Image.new("RGB", (1024, 768))])
    assert (klein.width, klein.height) == (1024, 768)


def test_large_reference_is_resized_with_a_log_line(caplog):
    big = Image.new("RGB", (2048, 1030))
    with caplog.at_level("INFO"):
        req = build_request(get_variant("klein-4b"), "p", refs=[big])
    assert "resized from 2048x1030" in caplog.text
    w, h = req.refs[0].size
    assert w % 16 == 0 and h % 16 == 0 and w * h <= 1024 * 1024
    assert (req.width, req.height) == (w, h)  # output size follows the first reference


def test_aspect_presets_keep_the_models_pixel_count():
    from flux2studio.images import ASPECTS, size_for_aspect

    klein = get_variant("klein-4b")
    assert build_request(klein, "p", aspect="16:9").width == 1360  # 1360x768: BFL's CLI default
    for aspect in ASPECTS:
        w, h = size_for_aspect(aspect, 1024 * 1024)
        a, b = (int(v) for v in aspect.split(":"))
        assert w % 16 == 0 and h % 16 == 0
        assert abs(w * h / (1024 * 1024) - 1) < 0.08 and abs(w / h - a / b) < 0.08
    with pytest.raises(ValueError, match="aspect '5:4' is not one of"):
        build_request(klein, "p", aspect="5:4")
    with pytest.raises(ValueError, match="give size or aspect, not both"):
        build_request(klein, "p", aspect="1:1", size=(64, 64))


def test_package_exposes_load():
    import flux2studio

    assert flux2studio.load.__module__ == "flux2studio.loading"


def test_compiled_blocks_give_the_same_image_and_compile_once():
    """`load(compile=True)` (`--compile`) puts each transformer block through `torch.compile` on first use; the
    image matches the eager one (fp32, within 1/255: the compiler may fuse and reorder float ops) and the blocks
    of a kind share their compiled code: a second call compiles nothing. Compiled blocks take the rotations as
    real (cos, sin) pairs (no complex numbers in compiled code): the same numbers as the complex product."""
    from flux2studio import load
    from flux2studio.model.transformer import apply_rope, rope_freqs

    rope = rope_freqs(torch.randint(0, 64, (50, 4)), (32, 32, 32, 32), 2000)
    x = torch.randn(2, 3, 50, 128)
    assert torch.equal(apply_rope(x, torch.view_as_real(rope)), apply_rope(x, rope))

    eager = load("nano", device="cpu", dtype="fp32", attention="sdpa")
    compiled = load("nano", device="cpu", dtype="fp32", attention="sdpa", compile=True)
    want = np.asarray(eager("a red circle", size=(64, 64), steps=2, seed=1)[0]).astype(int)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = np.asarray(compiled("a red circle", size=(64, 64), steps=2, seed=1)[0]).astype(int)
    model = compiled.transformer
    assert model.compiled and all(b._compiled_call_impl is not None for b in model.single_blocks)
    # Inductor's code cached per CPU capability (its keys omit it: AVX2-capped code loaded uncapped crashed)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith(os.sep + torch.backends.cpu.get_cpu_capability())
    assert np.abs(got - want).max() <= 1
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 2  # (a double and a single block at least)
    compiled("a blue square", size=(64, 64), steps=2, seed=2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled again
