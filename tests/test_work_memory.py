"""Work memory under a device budget: what each phase needs besides its weights, traced on the meta device (our
transformer and VAE) or counted from the config (text encoders), checked against the same count taken during a
real run on the CPU; and a pipeline keeping that room free, decoding in VAE tiles where a whole decode does not
fit, or refusing a request that cannot fit before any work."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flux2studio import device_streaming, pipeline
from flux2studio.device_streaming import PeakBytes, module_bytes, work_reserve
from flux2studio.images import to_pil
from flux2studio.loading import load
from flux2studio.model.autoencoder import AutoEncoder
from flux2studio.model.transformer import Flux2Transformer
from flux2studio.pipeline import Pipeline, allow_split_projection, build_request, check_vae_tile
from flux2studio.sampling import image_ids, text_ids
from flux2studio.text_encoders import TextEncoder
from flux2studio.variants import FLUX2_VAE, NANO_VAE, AutoencoderConfig
from flux2studio.work_memory import (
    text_encoder_bytes,
    text_encoder_work,
    traced_transformer,
    traced_vae,
    vae_work,
    vae_work_bound,
)
from tiny import QWEN3_SPEC, QWEN3_TEMPLATE, TRANSFORMER, VAE, klein_pipeline, qwen3, randomize_, tokenizer


def test_peak_bytes_counts_the_tensors_made_inside():
    a = torch.zeros(1000)  # made before: not counted
    with PeakBytes() as tracker:
        b = a * 2  # 4000 bytes
        c = b + 1  # 8000 live
        del b  # 4000
        c.add_(1)  # in place: nothing new
        view = c[:10]  # a view: nothing new
        d = view.exp()  # 40 bytes: 4040
    assert tracker.peak == 8000 and tracker.live == 4040
    del c, view, d


def _real_peak(run) -> int:
    with torch.no_grad(), PeakBytes() as tracker:
        out = run()
        del out
    return tracker.peak


@pytest.mark.parametrize("n_ref,kv,split", [(0, False, False), (0, False, True), (6, False, True), (6, True, True)])
def test_the_transformer_trace_counts_what_a_real_call_holds(n_ref, kv, split):
    """The meta trace (nothing computed) sees the bytes a real CPU call makes, through plain, joint-reference and
    cached-reference calls, single blocks' projections whole or split; the CPU's fused attention holds what the
    trace's stand-in does."""
    model = randomize_(Flux2Transformer(TRANSFORMER), std=0.05).eval()
    model.sdpa = F.scaled_dot_product_attention
    if split:
        allow_split_projection(model)
    h, w, n_txt, batch = 4, 6, 10, 2
    g = torch.Generator().manual_seed(0)
    x, txt = (
        torch.randn(batch, h * w, 128, generator=g),
        torch.randn(batch, n_txt, TRANSFORMER.context_dim, generator=g),
    )
    ids, t_ids, t, guidance = (
        image_ids(h, w),
        text_ids(n_txt),
        torch.full((1,), 0.5),
        torch.full((1,), 4.0),
    )  # as sampled
    ref, r_ids = torch.randn(1, n_ref, 128, generator=g), image_ids(2, 3) + 1  # one copy for the batch, as sampled

    def run():
        if not n_ref:
            return x - model(x.clone(), ids, txt.clone(), t_ids, t, guidance)
        if kv:
            cache = model.ref_kv(ref, r_ids, torch.zeros(1), guidance)
            return x - model(x.clone(), ids, txt.clone(), t_ids, t, guidance, cache)
        joint, joint_ids = torch.cat([x, ref.expand(batch, -1, -1)], dim=1), torch.cat([ids, r_ids])
        return x - model(joint, joint_ids, txt.clone(), t_ids, t, guidance)[:, : h * w]

    real = _real_peak(run)  # the clones stand for the inputs the trace makes itself
    traced = traced_transformer(TRANSFORMER, torch.float32, batch, h * w, n_txt, n_ref, kv, split)
    assert 0 < real <= traced <= 1.1 * real, (traced, real)  # never less; the trace holds its inputs too


@pytest.mark.parametrize("decode,tile", [(True, None), (False, None), (True, 32), (False, 48)])
def test_the_vae_trace_counts_what_a_real_call_holds(decode, tile):
    """Decoding and encoding traced whole; in tiles, counted from one tile's trace and every tile, row and result
    held (a bound: edge tiles are smaller)."""
    vae = randomize_(AutoEncoder(VAE), std=0.05).eval()
    per = VAE.downscale
    z = torch.randn(2, VAE.latent_channels, 12, 16)
    image = torch.rand(2, 3, 12 * per, 16 * per) * 2 - 1
    real = _real_peak(lambda: vae.decode(z.clone(), tile=tile) if decode else vae.encode(image.clone(), tile=tile))
    traced = traced_vae(VAE, torch.float32, 2, 12 * per, 16 * per, decode, tile)
    assert 0 < real <= traced <= (1.5 if tile else 1.1) * real, (traced, real)


ODD_VAES = [AutoencoderConfig(channels=(64, 256, 512, 512)), AutoencoderConfig(decoder_channels=(128, 512, 512, 512))]


@pytest.mark.parametrize("cfg", [VAE, NANO_VAE, FLUX2_VAE, *ODD_VAES], ids=["tiny", "nano", "flux2", "4x", "wide"])
def test_the_vae_bound_covers_its_trace_without_tracing(cfg, monkeypatch):
    """`vae_work_bound`: at least the traced work (`vae_work`) of whole images, decoding and encoding, square or
    not, fused attention or not, for VAEs of any widths (a user's file sets them: channels growing 4x a level, a
    decoder wider than its encoder), and within 2x of it for FLUX.2's VAE at 512x512: usable, not only safe. A CPU
    call with memory to spare plans its decode by it and traces nothing; short of memory it traces as before."""
    for (h, w), batch, decode, fused, dtype in [
        ((64, 64), 1, True, True, torch.float32),
        ((64, 64), 2, False, False, torch.bfloat16),
        ((128, 256), 1, False, True, torch.bfloat16),
        ((256, 128), 2, True, False, torch.float32),
        ((512, 512), 1, True, True, torch.bfloat16),
    ]:
        traced = vae_work(cfg, dtype, batch, h, w, decode, None, fused)
        bound = vae_work_bound(cfg, dtype, batch, h, w, fused)
        assert traced <= bound, (h, w, batch, decode, fused, dtype)
    assert bound <= 2 * traced or cfg is not FLUX2_VAE

    if cfg is NANO_VAE:
        traces = []
        monkeypatch.setattr(pipeline, "vae_work", lambda *a, **k: traces.append(a) or vae_work(*a, **k))
        pipe = load("nano", device="cpu", dtype="fp32")
        _available(monkeypatch, 2**34)
        pipe("a red circle", size=(64, 64), steps=1)
        assert traces == []
        _available(monkeypatch, module_bytes(pipe.vae) + vae_work_bound(cfg, torch.float32, 1, 64, 64) - 2**20)
        pipe("a red circle", size=(64, 64), steps=1)
        assert traces


def test_the_text_encoders_count_covers_a_real_encoding():
    """Text encoders are counted from their config (transformers' mask code needs real values, no meta trace): the
    count bounds what a real encoding holds, without doubling it."""
    encoder = TextEncoder(QWEN3_SPEC, qwen3(), tokenizer(QWEN3_TEMPLATE))
    prompts = ["a red fox", "a blue bird"]
    real = _real_peak(lambda: encoder(prompts))
    counted = text_encoder_bytes(encoder.model.config, torch.float32, len(prompts), QWEN3_SPEC)
    assert real <= counted <= 2 * real, (counted, real)


def test_an_encoding_keeps_only_the_hidden_states_it_stacks():
    """A 24-layer encoder stacking 3 layers' states holds less than its 25 hidden states alone would take (as with
    `output_hidden_states`, 0.3 MB here): the others are freed as the next layer runs. The count bounds it."""
    spec = replace(QWEN3_SPEC, layers=(1, 12, 24))
    encoder = TextEncoder(spec, qwen3(layers=24), tokenizer(QWEN3_TEMPLATE))
    prompts = ["a red fox", "a blue bird"]
    real = _real_peak(lambda: encoder(prompts))
    every_state = 25 * len(prompts) * spec.max_length * encoder.model.config.hidden_size * 4
    counted = text_encoder_bytes(encoder.model.config, torch.float32, len(prompts), spec)
    assert real <= counted < every_state, (real, counted, every_state)


def test_the_reference_cache_holds_only_its_keys_and_values():
    """Cached keys and values own their memory: a view of a block's fused projection would keep all of it alive
    (3x the values' bytes in every block, for the whole phase)."""
    model = Flux2Transformer(TRANSFORMER).eval()
    with torch.no_grad():
        cache = model.ref_kv(torch.randn(1, 6, 128), image_ids(2, 3) + 1, torch.zeros(1), torch.full((1,), 4.0))
    for k, v in cache:
        for t in (k, v):
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.fixture
def no_headroom(monkeypatch):
    """Work reserved as traced (the fixed headroom for a GPU's workspaces would dwarf a tiny model's work)."""
    monkeypatch.setattr(device_streaming, "WORK_HEADROOM", 0)


def _weights(pipe: Pipeline) -> tuple[int, list[int]]:
    model = pipe.parts["transformer"].get()
    sizes = [module_bytes(b) for b in [*model.double_blocks, *model.single_blocks]]
    return module_bytes(model) - sum(sizes), sizes


def test_a_budget_keeps_room_for_the_work_of_each_request(no_headroom):
    """The streaming plan leaves the request's work memory free: a larger image streams more blocks within the
    same budget; the images are the same as without a budget."""
    plain = klein_pipeline()
    fixed, sizes = _weights(plain)
    small, large = (build_request(plain.variant, "x", size=(s, s)) for s in (64, 128))
    work_small, work_large = (plain.work_estimates(r)["transformer"] for r in (small, large))
    assert work_large > work_small
    budget = fixed + sum(sizes) + work_small  # the whole transformer fits beside the small image's work only
    assert budget >= fixed + 2 * max(sizes) + work_large  # the large one's streams
    pipe = klein_pipeline(budget)
    model = pipe.parts["transformer"].get()
    plans = []
    for size in (64, 128):
        expected = plain("a red circle", size=(size, size), steps=2, seed=3)[0]
        seen = lambda i, n, x: plans.append((model.block_streamer.plan, pipe.work["transformer"]))  # noqa: E731
        got = pipe("a red circle", size=(size, size), steps=2, seed=3, callback=seen)[0]
        assert got.tobytes() == expected.tobytes()
    (first, w1), (second, w2) = plans[0], plans[-1]
    assert (w1, w2) == (work_small, work_large)
    for plan, work in ((first, w1), (second, w2)):
        assert plan.work == work and plan.peak + work <= budget
    assert not first.streamed and second.streamed


def _counting_encodes(pipe: Pipeline) -> list:
    """The prompts `pipe` encodes from now on, one entry per encoding (empty: no work started)."""
    encoded, original = [], pipe.encode_prompts
    pipe.encode_prompts = lambda prompts: encoded.append(prompts) or original(prompts)
    return encoded


def test_a_request_that_cannot_fit_is_refused_before_any_work(no_headroom):
    """A budget with room for the streamed weights and a small image's work but not a large image's: the large
    one is refused before the text encoder runs, naming the size and what would fit; the small one runs."""
    plain = klein_pipeline()
    fixed, sizes = _weights(plain)
    small, large = (build_request(plain.variant, "x", size=(s, s)) for s in (64, 256))
    work_small, work_large = (plain.work_estimates(r) for r in (small, large))
    need = max(fixed + 2 * max(sizes) + work_small["transformer"], work_small["VAE"] + module_bytes(plain.vae))
    pipe = klein_pipeline(need)
    assert need < fixed + 2 * max(sizes) + work_large["transformer"]
    encoded = _counting_encodes(pipe)
    with pytest.raises(ValueError, match=r"klein-4b's (transformer|VAE) at 256x256: .*work memory.*smaller image"):
        pipe("a red circle", size=(256, 256), steps=1)
    assert not encoded
    pipe("a red circle", size=(64, 64), steps=1)
    assert encoded


def _available(monkeypatch, room: int) -> None:
    """The machine has memory available for a call to plan `room` bytes (`pipeline.RAM_SHARE` of it)."""
    monkeypatch.setattr(pipeline, "available_ram", lambda: int(room / pipeline.RAM_SHARE) + 2)


@pytest.mark.parametrize("where", ["budget", "cpu"])
def test_a_batch_whose_work_does_not_fit_at_once_is_denoised_in_parts(no_headroom, monkeypatch, where):
    """Room for two of three images' work, under a device budget or in a CPU's available memory: the transformer
    denoises two images, then one (a budget was refused before), each bit for bit the image of one call; progress
    counts the steps of both parts. With room for all, one part."""
    plain = klein_pipeline()
    fixed, sizes = _weights(plain)
    prompts, kw = ["a red circle", "a blue square", "a green triangle"], dict(size=(64, 64), steps=2, seed=3)
    req = build_request(plain.variant, prompts, **kw)
    held = fixed + 2 * max(sizes)
    room = held + plain._transformer_work(req, 2)
    assert held + plain._transformer_work(req, 3) > room >= module_bytes(plain.vae) + plain.work_estimates(req)["VAE"]
    expected = [im.tobytes() for im in plain(prompts, **kw)]
    if where == "budget":
        pipe = klein_pipeline(room)
    else:
        pipe = klein_pipeline()
        _available(monkeypatch, room)
    batches, steps = [], []
    pipe.parts["transformer"].get().register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    got = pipe(prompts, **kw, callback=lambda i, n, x0: steps.append((i, n, x0)))
    assert [im.tobytes() for im in got] == expected
    assert batches == [2, 2, 1, 1]
    assert steps == [(0, 4, None), (1, 4, None), (2, 4, None), (3, 4, None)]  # no x0: it would not cover the batch
    if where == "cpu":
        _available(monkeypatch, 100 * room)
        batches.clear()
        assert [im.tobytes() for im in pipe(prompts, **kw)] == expected
        assert batches == [3, 3]


def test_prompts_whose_encoding_does_not_fit_at_once_are_encoded_in_parts(no_headroom, monkeypatch):
    """Room for two prompts' text-encoder work (the stacked layers' hidden states kept) but not three: two are encoded,
    then one; the images are bit for bit those of one call."""
    plain = klein_pipeline()
    prompts, kw = ["a red circle", "a blue square", "a green triangle"], dict(size=(64, 64), steps=1, seed=3)
    expected = [im.tobytes() for im in plain(prompts, **kw)]
    pipe = klein_pipeline()
    model = pipe.parts["text_encoder"].get().model
    sizes = [module_bytes(layer) for layer in model.layers]
    held = module_bytes(model) - sum(sizes) + sum(sorted(sizes, reverse=True)[:2])
    work = [text_encoder_work(model.config, pipe.dtype, k, QWEN3_SPEC) for k in (2, 3)]
    _available(monkeypatch, held + work[0])
    assert held + work[1] > held + work[0]
    batches = []
    model.register_forward_pre_hook(lambda _, args, kwargs: batches.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)  # fmt: skip
    assert [im.tobytes() for im in pipe(prompts, **kw)] == expected
    assert batches == [2, 1]


def test_a_cpu_without_memory_for_a_whole_decode_works_in_tiles(no_headroom, monkeypatch, caplog):
    """On a CPU (no device budget) whose available memory holds a 256-pixel tile's VAE work but not a whole
    384x384 decode's: the VAE works in 256-pixel tiles, recorded in the image (as `vae_tile=256` makes it), and a
    log line says why. With memory enough it decodes whole, as before."""
    pipe = klein_pipeline()
    vae = module_bytes(pipe.vae)
    whole, tiled = (pipe._vae_work(1, 384, 384, tile=t) for t in (None, 256))
    assert tiled < whole
    _available(monkeypatch, vae + tiled)
    kw = dict(size=(384, 384), steps=1, seed=2)
    with caplog.at_level("INFO", logger="flux2studio.pipeline"):
        image = pipe("a red circle", **kw)[0]
    assert json.loads(image.info["flux2"])["vae_tile"] == 256
    assert "256-pixel tiles" in caplog.text
    _available(monkeypatch, 100 * (vae + whole))
    assert "vae_tile" not in json.loads(pipe("a red circle", **kw)[0].info["flux2"])
    pipe.vae_tile = 256
    assert pipe("a red circle", **kw)[0].tobytes() == image.tobytes()


def test_a_cpu_short_of_memory_even_for_tiles_warns_once_a_call(no_headroom, monkeypatch, caplog):
    """Available memory below even the smallest tile's VAE work: the smallest tile, and one warning (the machine
    may still have swap), once a call though the tile is planned for the start image's encoding and the decode."""
    pipe = klein_pipeline()
    _available(monkeypatch, module_bytes(pipe.vae) + 1)
    start = Image.new("RGB", (320, 320), "red")
    with caplog.at_level("WARNING", logger="flux2studio.pipeline"):
        pipe("a red circle", image=start, size=(320, 320), steps=1, seed=2)
    assert caplog.text.count("even in 256-pixel tiles") == 1, caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="flux2studio.pipeline"):
        pipe("a red circle", image=start, size=(320, 320), steps=1, seed=2)
    assert caplog.text.count("even in 256-pixel tiles") == 1  # and again in the next call


def test_work_reserve_adds_room_for_what_a_trace_cannot_see():
    assert work_reserve(0) == device_streaming.WORK_HEADROOM
    assert work_reserve(10 * 2**20) == int(10 * 2**20 * device_streaming.WORK_FACTOR) + device_streaming.WORK_HEADROOM


def test_vae_tiles_decode_larger_images_and_are_recorded():
    """`vae_tile`: larger images decoded in tiles (the VAE's own tiled decode, parity-tested in test_vae), the tile
    written in the image's metadata; images within a tile decoded whole; a bad tile named with the allowed ones."""
    pipe = klein_pipeline()
    pipe.vae_tile = 256
    req = build_request(pipe.variant, "a red circle", size=(512, 384), steps=1, seed=2)
    with torch.no_grad():
        latents = pipe.generate_latents(req)
        expected = pipe.parts["vae"].get().decode(latents, tile=256)
        whole = pipe.parts["vae"].get().decode(latents)
    image = pipe("a red circle", size=(512, 384), steps=1, seed=2)[0]
    assert image.tobytes() == to_pil(expected)[0].tobytes() != to_pil(whole)[0].tobytes()
    assert json.loads(image.info["flux2"])["vae_tile"] == 256
    small = pipe("a red circle", size=(256, 192), steps=1, seed=2)[0]
    assert "vae_tile" not in json.loads(small.info["flux2"])
    for bad in (100, 4096, "512"):
        with pytest.raises(ValueError, match=rf"VAE tile {bad!r}: give a multiple of 64 pixels from 128 to 2048"):
            check_vae_tile(bad)


def test_a_budget_decodes_in_tiles_where_a_whole_decode_does_not_fit(no_headroom):
    """Under a budget too small for a whole decode, the VAE decodes in the largest tiles that fit (the same image
    as that tile asked for without a budget); with no tile small enough, refused before any work."""
    plain = klein_pipeline()
    vae_bytes = module_bytes(plain.vae)
    cfg = plain.variant.vae
    whole, tiled = (vae_work(cfg, plain.dtype, 1, 512, 512, True, t) for t in (None, 384))
    fixed, sizes = _weights(plain)
    req = build_request(plain.variant, "x", size=(512, 512))
    budget = vae_bytes + tiled
    assert vae_bytes + whole > budget >= fixed + 2 * max(sizes) + plain.work_estimates(req)["transformer"]
    pipe = klein_pipeline(budget)
    image = pipe("a red circle", size=(512, 512), steps=1, seed=4)[0]
    assert json.loads(image.info["flux2"])["vae_tile"] == 384  # 1024, 768 and 512 are whole decodes at 512x512
    plain.vae_tile = 384
    assert image.tobytes() == plain("a red circle", size=(512, 512), steps=1, seed=4)[0].tobytes()
    pipe.vram_budget = vae_bytes + vae_work(cfg, plain.dtype, 1, 512, 512, True, 256) - 1
    encoded = _counting_encodes(pipe)
    with pytest.raises(ValueError, match=r"klein-4b's VAE decoding 512x512: even in 256-pixel tiles it needs"):
        pipe("a red circle", size=(512, 512), steps=1)
    assert not encoded


def test_estimates_count_what_the_device_and_the_weights_add():
    """Where attention materialises its scores (Apple GPUs) they are counted; where a layer's weight is widened
    for its call (packed, fp8 or narrower weights) the widest layer is added; a pipeline keeps no request after
    its call."""
    from flux2studio.work_memory import transformer_work, widest_layer

    cfg, n_img, n_txt = TRANSFORMER, 1024, 16  # long: the scores outweigh the rest
    fused = transformer_work(cfg, torch.float32, 1, n_img, n_txt)
    scores = 1 * TRANSFORMER.num_heads * (n_img + n_txt) ** 2 * 4
    assert transformer_work(cfg, torch.float32, 1, n_img, n_txt, fused=False) >= fused + scores
    plain = transformer_work(cfg, torch.float32, 1, n_img, n_txt, split=False)
    packed = traced_transformer(cfg, torch.float32, 1, n_img, n_txt, 0, False, False) + widest_layer(cfg) * 4
    assert plain == work_reserve(packed) and widest_layer(cfg) == 64 * (3 * 64 + 2 * 3 * 64)  # linear1
    pipe = klein_pipeline(10 * 2**30)
    pipe("x", size=(64, 64), steps=1)
    assert pipe._request is None and set(pipe.planned) == {"text encoder", "transformer", "VAE"}


def test_an_unloaded_transformer_is_sized_as_its_file_stores_it(no_headroom, tmp_path):
    """Before the transformer is loaded, the up-front check sizes it from the skeleton, scaled to its single file
    where that is stored smaller (a GGUF or int8 file stays that size in memory): a budget that the bf16 size
    would refuse passes."""
    from flux2studio.pipeline import Component

    plain = klein_pipeline()
    model, (fixed, sizes) = plain.parts["transformer"].get(), _weights(plain)
    req = build_request(plain.variant, "x", size=(64, 64))
    budget = (fixed + 2 * max(sizes)) // 3 + plain.work_estimates(req)["transformer"]
    small = tmp_path / "transformer-Q4_0.gguf"
    with open(small, "wb") as f:
        f.truncate(module_bytes(model) // 4)

    def lazy(files):
        pipe = Pipeline(plain.variant, Component(lambda: model, files=files), plain.vae, plain.text_encoder,
                        vram_budget=budget)  # fmt: skip
        pipe._check_budget(req)

    with pytest.raises(ValueError, match="too small for klein-4b's transformer at 64x64"):
        lazy(())
    lazy([small])


def _vae_calls(pipe: Pipeline) -> list[tuple[str, tuple[int, int], int | None]]:
    """The VAE's calls from now on: (encode or decode, input size, tile)."""
    vae, calls = pipe.parts["vae"].get(), []
    encode, decode = vae.encode, vae.decode
    vae.encode = lambda x, tile=None: calls.append(("encode", tuple(x.shape[-2:]), tile)) or encode(x, tile=tile)
    vae.decode = lambda z, tile=None: calls.append(("decode", tuple(z.shape[-2:]), tile)) or decode(z, tile=tile)
    return calls


def test_vae_tiles_also_encode_the_images_a_request_starts_from(no_headroom):
    """Start and reference images larger than the request's VAE tile are encoded in it too (the VAE's tiled encode,
    parity-tested in test_vae), one tile for the request, recorded when any image was tiled; under a budget that a
    large reference's whole encode does not fit, its tiles are chosen for it; with none small enough, the up-front
    check refuses, naming the encoding."""
    plain = klein_pipeline()
    ref = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    args = dict(size=(256, 256), steps=1, seed=5, refs=[ref])
    whole = plain("a red circle", **args)[0]
    assert "vae_tile" not in json.loads(whole.info["flux2"])
    plain.vae_tile = 384
    calls = _vae_calls(plain)
    tiled = plain("a red circle", **args)[0]
    assert calls == [("encode", (512, 512), 384), ("decode", (16, 16), 384)]  # the decode is within one tile
    assert json.loads(tiled.info["flux2"])["vae_tile"] == 384 and tiled.tobytes() != whole.tobytes()

    cfg, vae_bytes = plain.variant.vae, module_bytes(plain.vae)
    encode, decode = (vae_work(cfg, plain.dtype, 1, 512, 512, False, t) for t in (None, 384))
    budget = vae_bytes + decode
    assert vae_bytes + encode > budget >= vae_bytes + vae_work(cfg, plain.dtype, 1, 256, 256, True)
    fixed, sizes = _weights(plain)
    assert (
        budget
        >= fixed + 2 * max(sizes) + plain.work_estimates(build_request(plain.variant, "x", **args))["transformer"]
    )
    pipe = klein_pipeline(budget)
    calls = _vae_calls(pipe)
    image = pipe("a red circle", **args)[0]
    assert calls == [("encode", (512, 512), 384), ("decode", (16, 16), 384)]
    assert json.loads(image.info["flux2"])["vae_tile"] == 384 and image.tobytes() == tiled.tobytes()
    big = dict(size=(128, 128), refs=[ref.resize((1024, 1024))])  # the encoding needs more than the decoding
    pipe.vram_budget = vae_bytes + vae_work(cfg, plain.dtype, 1, 1024, 1024, False, 256) - 1
    assert pipe.vram_budget > vae_bytes + vae_work(cfg, plain.dtype, 1, 128, 128, True)
    with pytest.raises(ValueError, match=r"klein-4b's VAE encoding a 1024x1024 image: even in 256-pixel tiles it "):
        pipe._request_tile(build_request(plain.variant, "x", **big))  # (the transformer's check runs before this)
