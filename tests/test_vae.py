"""VAE parity with diffusers 0.42.1 `AutoencoderKLFlux2` plus the Flux2 pipelines' latent handling."""

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

from flux2studio.layouts.vae import vae_from_diffusers, vae_to_diffusers
from flux2studio.model.autoencoder import AutoEncoder, patchify, unpatchify
from flux2studio.variants import FLUX2_VAE, AutoencoderConfig

# fp32 on CPU: same ops in the same order (attention projections applied as Linear, as diffusers does);
# measured max abs diff 0.0 on encode and decode with torch 2.13 CPU. Bound 1e-5 leaves room for other
# BLAS/oneDNN kernels (with 1x1 convs in the attention the diffs were ~1e-6 to 1.4e-5 at outputs ~4).
TOL = 1e-5

# Two levels as in the brief; three levels with decoder widths unlike the encoder's (nin_shortcuts on
# both sides, the decoder level reversal and 2 resnets per level all matter there).
TINY = AutoencoderConfig(channels=(32, 64), num_res_blocks=1, z_channels=32, norm_groups=32)
DEEP = AutoencoderConfig(
    channels=(16, 32, 32), decoder_channels=(8, 16, 24), num_res_blocks=2, z_channels=4, norm_groups=8
)
CONFIGS = {"tiny": TINY, "deep": DEEP}


def _diffusers_vae(cfg: AutoencoderConfig) -> AutoencoderKLFlux2:
    n = len(cfg.channels)
    return AutoencoderKLFlux2(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.channels,
        decoder_block_out_channels=cfg.decoder_channels,
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups,
        batch_norm_eps=cfg.bn_eps,
        patch_size=(cfg.patch, cfg.patch),
    )


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request) -> tuple[AutoencoderConfig, AutoencoderKLFlux2, AutoEncoder]:
    """(config, diffusers reference, ours loaded strictly from the reference's converted weights). The reference
    with `enable_slicing()`: a batch one image at a time, as ours runs it (a batched fp32 convolution rounds
    otherwise: 1.4e-5 on `deep`, 64x96)."""
    cfg = CONFIGS[request.param]
    torch.manual_seed(0)
    ref = _diffusers_vae(cfg).eval()
    ref.enable_slicing()
    with torch.no_grad():  # GroupNorms start as identity and bn as (0, 1): randomise so they matter
        for module in ref.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
        ref.bn.running_mean.normal_(0.0, 0.5)
        ref.bn.running_var.uniform_(0.3, 3.0)
    ours = AutoEncoder(cfg).eval()
    ours.load_state_dict(vae_from_diffusers(ref.state_dict(), cfg), strict=True)
    return cfg, ref, ours


def _bn_stats(ref: AutoencoderKLFlux2) -> tuple[torch.Tensor, torch.Tensor]:
    # as Flux2KleinPipeline._encode_vae_image and __call__ compute them
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    return mean, std


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    cfg, ref, ours = pair
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # Flux2KleinPipeline._encode_vae_image: argmax sample mode, patchify, bn normalisation
    z = Flux2KleinPipeline._patchify_latents(ref.encode(x).latent_dist.mode())
    mean, std = _bn_stats(ref)
    expected = (z - mean) / std
    got = ours.encode(x)
    assert got.shape == (2, cfg.latent_channels, 64 // cfg.downscale, 96 // cfg.downscale)
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, f"encode max abs diff {diff:.2e} > {TOL:.0e}"


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    cfg, ref, ours = pair
    h, w = 64 // cfg.downscale, 96 // cfg.downscale  # a 64x96 image
    zp = torch.randn(2, cfg.latent_channels, h, w, generator=torch.Generator().manual_seed(2))
    # Flux2KleinPipeline.__call__: undo the bn normalisation, unpatchify, vae.decode
    mean, std = _bn_stats(ref)
    expected = ref.decode(Flux2KleinPipeline._unpatchify_latents(zp * std + mean)).sample
    got = ours.decode(zp)
    assert got.shape == (2, 3, 64, 96)
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, f"decode max abs diff {diff:.2e} > {TOL:.0e}"


@torch.no_grad()
@pytest.mark.parametrize("tile", [32, 48])
def test_tiled_decode_matches_diffusers_tiling(pair, tile):
    """Decoding in overlapping tiles, blended as diffusers' `enable_tiling()` blends them, at the same tile size."""
    cfg, ref, ours = pair
    f = cfg.downscale // cfg.patch
    zp = torch.randn(2, cfg.latent_channels, 64 // cfg.downscale, 96 // cfg.downscale,
                     generator=torch.Generator().manual_seed(3))  # fmt: skip
    mean, std = _bn_stats(ref)
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size = tile, tile // f
    try:
        expected = ref.decode(Flux2KleinPipeline._unpatchify_latents(zp * std + mean)).sample
    finally:
        ref.disable_tiling()
    got = ours.decode(zp, tile=tile)
    whole = ours.decode(zp)
    assert got.shape == whole.shape == (2, 3, 64, 96)
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, f"tiled decode max abs diff {diff:.2e} > {TOL:.0e}"
    assert (got - whole).abs().max().item() > 10 * TOL  # tiles see less context: not the whole decode's numbers
    assert torch.equal(ours.decode(zp, tile=128), whole)  # an image within one tile is decoded whole


@torch.no_grad()
@pytest.mark.parametrize("tile", [32, 48])
def test_tiled_encode_matches_diffusers_tiling(pair, tile):
    """Encoding in overlapping tiles as diffusers' `enable_tiling()` encodes (tiled moments blended, then the mean),
    at the same tile size."""
    cfg, ref, ours = pair
    f = cfg.downscale // cfg.patch
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mean, std = _bn_stats(ref)
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size = tile, tile // f
    try:
        expected = (Flux2KleinPipeline._patchify_latents(ref.encode(x).latent_dist.mode()) - mean) / std
    finally:
        ref.disable_tiling()
    got, whole = ours.encode(x, tile=tile), ours.encode(x)
    assert got.shape == whole.shape == (2, cfg.latent_channels, 64 // cfg.downscale, 96 // cfg.downscale)
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, f"tiled encode max abs diff {diff:.2e} > {TOL:.0e}"
    assert (got - whole).abs().max().item() > 10 * TOL  # tiles see less context: not the whole encode's numbers
    assert torch.equal(ours.encode(x, tile=128), whole)  # an image within one tile is encoded whole


@torch.no_grad()
@pytest.mark.parametrize("tile", [None, 32])
def test_an_image_has_the_same_numbers_alone_or_in_a_batch(pair, tile):
    """Encoded and decoded one at a time, whole or in tiles: image i of a batch is bit for bit the image alone
    (what lets `--from` remake image 3 of `--num 4` alone, and a served job not depend on its batch-mates)."""
    cfg, _, ours = pair
    x = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(5)) * 2 - 1
    zp = torch.randn(3, cfg.latent_channels, 64 // cfg.downscale, 96 // cfg.downscale,
                     generator=torch.Generator().manual_seed(6))  # fmt: skip
    latents, images = ours.encode(x, tile=tile), ours.decode(zp, tile=tile)
    for i in range(3):
        assert torch.equal(latents[i : i + 1], ours.encode(x[i : i + 1], tile=tile))
        assert torch.equal(images[i : i + 1], ours.decode(zp[i : i + 1], tile=tile))


def test_key_conversion_round_trips_exactly(pair):
    cfg, ref, ours = pair
    theirs = ref.state_dict()
    converted = vae_from_diffusers(theirs, cfg)
    # no copies: every converted tensor is one of the originals or a view of it
    assert {t.data_ptr() for t in converted.values()} == {t.data_ptr() for t in theirs.values()}
    back = vae_to_diffusers(converted, cfg)
    assert list(back) == list(theirs)
    for key, tensor in theirs.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape, key
        assert torch.equal(back[key], tensor), key
    # and the other way: our state dict loads strictly into a fresh diffusers model
    _diffusers_vae(cfg).load_state_dict(vae_to_diffusers(ours.state_dict(), cfg), strict=True)


def test_full_size_layout_matches_diffusers():
    """Default FLUX.2 VAE on the meta device: diffusers' keys map onto exactly ours, with our shapes."""
    with torch.device("meta"):
        ref = AutoencoderKLFlux2()
        ours = AutoEncoder(FLUX2_VAE)
    converted = {k: tuple(v.shape) for k, v in vae_from_diffusers(ref.state_dict(), FLUX2_VAE).items()}
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert converted == expected
    # spot checks of the official names
    assert expected["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert expected["decoder.up.0.block.2.conv2.weight"] == (128, 128, 3, 3)  # up.0: highest resolution
    assert expected["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert expected["bn.running_var"] == (128,)


def test_unknown_keys_raise_naming_them(pair):
    cfg, ref, ours = pair
    theirs = dict(ref.state_dict(), **{"encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"encoder\.extra\.weight"):
        vae_from_diffusers(theirs, cfg)
    mine = dict(ours.state_dict(), **{"decoder.up.9.block.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"decoder\.up\.9\.block\.0\.conv1\.weight"):
        vae_to_diffusers(mine, cfg)


def test_patchify_matches_diffusers_bit_for_bit():
    z = torch.randn(2, 5, 6, 8, generator=torch.Generator().manual_seed(3))
    zp = patchify(z, 2)
    assert torch.equal(zp, Flux2KleinPipeline._patchify_latents(z))
    assert torch.equal(unpatchify(zp, 2), Flux2KleinPipeline._unpatchify_latents(zp))
    assert torch.equal(unpatchify(zp, 2), z)


def test_bad_sizes_raise():
    ours = AutoEncoder(TINY)
    with pytest.raises(ValueError, match="multiple of 4"):
        ours.encode(torch.zeros(1, 3, 64, 66))
    with pytest.raises(ValueError, match="channels"):
        ours.decode(torch.zeros(1, 32, 4, 4))


# Low precision against our own fp32 result, tiny config (outputs ~2 in magnitude); bf16 keeps 8 mantissa
# bits, fp16 11. Measured max abs diffs: bf16 ~0.017 (encode), ~0.026 (decode); fp16 ~0.002, ~0.003.
LOW_PRECISION_TOL = {torch.bfloat16: 1e-1, torch.float16: 2e-2}


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_runs_in_module_dtype(dtype):
    torch.manual_seed(0)
    ours = AutoEncoder(TINY).eval()
    ours.bn.running_mean.normal_(0.0, 0.5)
    ours.bn.running_var.uniform_(0.3, 3.0)
    low = AutoEncoder(TINY).to(dtype).eval()
    low.load_state_dict(ours.state_dict())
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1
    zp = torch.randn(1, TINY.latent_channels, 8, 12, generator=torch.Generator().manual_seed(5))
    for name, got, expected in (
        ("encode", low.encode(x.to(dtype)), ours.encode(x)),
        ("decode", low.decode(zp.to(dtype)), ours.decode(zp)),
    ):
        assert got.dtype == dtype, name
        diff = (got.float() - expected).abs().max().item()
        assert diff <= LOW_PRECISION_TOL[dtype], f"{dtype} {name} max abs diff {diff:.2e} > {LOW_PRECISION_TOL[dtype]}"
