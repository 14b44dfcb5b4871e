"""How much device memory a phase needs besides its weights, at a request's shapes: what a `--vram` budget keeps
free for activations. Our transformer and VAE are run on the meta device under `PeakBytes` (the tensors our
modules make, at their real shapes, nothing computed: chunking and split paths counted as they run; a widened
packed weight, which the plain skeleton does not make, is added); the text encoders, transformers' models whose
mask code needs real values, are counted from their configs. Traces are cached per shape: a server's repeated
requests trace once.
"""

from __future__ import annotations

import functools

import torch

from .device_streaming import attention_shapes, flash_attention_shapes, traced_work, work_reserve
from .model.autoencoder import AutoEncoder, tile_grid
from .model.transformer import Flux2Transformer
from .variants import AutoencoderConfig, TextEncoderSpec, TransformerConfig


def transformer_work(cfg: TransformerConfig, dtype: torch.dtype, batch: int, n_img: int, n_txt: int, n_ref: int = 0,
                     kv_cache: bool = False, split: bool = True, fused: bool = True) -> int:  # fmt: skip
    """Device bytes to keep for one denoising call of a transformer of shape `cfg` (`work_reserve` of its traced
    peak): `batch` images of `n_img` tokens, `n_txt` text tokens, `n_ref` reference tokens (attended with the
    image tokens, or with `kv_cache` given as cached keys and values, held for the whole phase). `split`: the
    single blocks compute their fused projection in parts (`pipeline.allow_split_projection`: plain weights);
    otherwise a layer's weight may also be widened to the compute dtype for its call (packed, fp8 or narrower
    weights, LoRA hooks): the largest one is added. `fused`: attention without the (L, L) scores (CUDA's kernels;
    elsewhere they are counted, `attention_shapes`)."""
    traced = traced_transformer(cfg, dtype, batch, n_img, n_txt, n_ref, kv_cache, split, fused)
    return work_reserve(traced + (0 if split else widest_layer(cfg) * dtype.itemsize))


@functools.lru_cache(maxsize=16)
def widest_layer(cfg: TransformerConfig) -> int:
    """The most weights one linear layer of the transformer has."""
    with torch.device("meta"):
        model = Flux2Transformer(cfg)
    return max(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@functools.lru_cache(maxsize=64)
def traced_transformer(cfg: TransformerConfig, dtype: torch.dtype, batch: int, n_img: int, n_txt: int,
                       n_ref: int, kv_cache: bool, split: bool, fused: bool = True) -> int:  # fmt: skip
    """The peak bytes of tensors one such call makes, traced on the meta device."""
    with torch.device("meta"):
        model = Flux2Transformer(cfg).to(dtype)
    model.sdpa = attention_shapes if not fused else flash_attention_shapes
    for block in model.single_blocks:
        block.split_linear1 = split

    def run() -> torch.Tensor:
        with torch.device("meta"):
            context = torch.empty(batch, n_txt, cfg.context_dim, dtype=dtype)  # the prompts' embeddings
            x = torch.empty(batch, n_img, cfg.in_channels, dtype=dtype)
            txt_ids, img_ids = torch.empty(n_txt, 4, dtype=torch.long), torch.empty(n_img, 4, dtype=torch.long)
            t = torch.empty(1)  # one noise level (and guidance) for the batch, as the sampler gives it
            guidance = torch.empty(1) if cfg.guidance_embed else None
            if not n_ref:
                return x - model(x, img_ids, context, txt_ids, t, guidance)  # a sampler step's update
            ref = torch.empty(1, n_ref, cfg.in_channels, dtype=dtype)  # the batch's references, one copy
            ref_ids = torch.empty(n_ref, 4, dtype=torch.long)
            if kv_cache:
                ref_kv = model.ref_kv(ref, ref_ids, torch.zeros(1), guidance)
                return x - model(x, img_ids, context, txt_ids, t, guidance, ref_kv)
            joint, ids = torch.cat([x, ref.expand(batch, -1, -1)], dim=1), torch.cat([img_ids, ref_ids])
            return x - model(joint, ids, context, txt_ids, t, guidance)[:, :n_img]

    return traced_work(run)


def vae_work(cfg: AutoencoderConfig, dtype: torch.dtype, batch: int, height: int, width: int, decode: bool,
             tile: int | None = None, fused: bool = True) -> int:  # fmt: skip
    """Device bytes to keep for decoding `batch` images of `height` x `width` pixels, or encoding them, one at a
    time (in `tile`-pixel tiles: one tile's work and the tiles' results held); `fused` as for `transformer_work`."""
    return work_reserve(traced_vae(cfg, dtype, batch, height, width, decode, tile, fused))


VAE_BYTES_A_PIXEL, VAE_BYTES_FIXED = 6, 4 << 20  # `vae_work_bound`'s: traced peaks stay under 4.5 (below)


def vae_work_bound(cfg: AutoencoderConfig, dtype: torch.dtype, batch: int, height: int, width: int,
                   fused: bool = True) -> int:  # fmt: skip
    """At least `vae_work` for decoding or encoding whole `height` x `width` images, from the shapes alone: no
    trace (a first trace imports PyTorch's compiler, which its meta kernels are wrapped for: ~1 s of a first
    call). A level's activations scale with its pixels and the channels it holds, its own or, where it meets the
    next level (the decoder's upsampling makes the deeper level's channels at this level's size), the next
    level's: per pixel of the image, `widest` of max(c[l], c[l + 1]) / 4**l. Traced peaks stayed under 4.5 bytes
    per pixel per `dtype.itemsize` and `widest`, plus 4 MB, for FLUX.2's, nano's, the tests' and odd VAEs
    (channels growing 4x a level, decoders wider than encoders, 3 blocks a level) from 64 to 1024 pixels,
    encoding and decoding, batch 1-2, fp32 and bf16 (tests/test_work_memory.py checks a grid); 6 is taken, plus
    the mid-block attention's scores and their softmax where not `fused`."""
    f = cfg.spatial_scale
    sides = (cfg.channels, cfg.decoder_channels or cfg.channels)  # level l: 1 / 4**l of the pixels
    widest = max(max(c[l : l + 2]) / 4**l for c in sides for l in range(len(c)))  # a level and the next
    tokens = (height // f) * (width // f)
    scores = 0 if fused else 2 * batch * tokens * tokens * dtype.itemsize
    pixels = batch * height * width * dtype.itemsize
    return work_reserve(int(VAE_BYTES_A_PIXEL * pixels * widest) + scores + VAE_BYTES_FIXED)


def traced_vae(cfg: AutoencoderConfig, dtype: torch.dtype, batch: int, height: int, width: int, decode: bool,
               tile: int | None = None, fused: bool = True) -> int:  # fmt: skip
    """The peak bytes of tensors the VAE makes decoding (or encoding) such images, one at a time: traced on the
    meta device; in tiles, one whole tile traced (or the joined rows and result, if more) on top of one image's
    tile results held (as `AutoEncoder._tiled` keeps them), the other images' results and the inputs: the images,
    or the latents denormalised and unpatchified."""
    if tile is None or max(height, width) <= tile:
        return _traced_vae(cfg, dtype, batch, height, width, decode, fused)
    f = cfg.spatial_scale  # pixels per unpatchified latent
    size, out, channels = (tile // f, tile, cfg.out_channels) if decode else (tile, tile // f, 2 * cfg.z_channels)
    stride, _, _ = tile_grid(size, out)
    scale = out / size  # results per input a side

    def sides(extent: int) -> int:  # the results along one side of every tile (edge tiles are smaller)
        return sum(round(min(size, extent - start) * scale) for start in range(0, extent, stride))

    item = dtype.itemsize  # an image's
    results = item * channels * sides(height // (f if decode else 1)) * sides(width // (f if decode else 1))
    latents = item * cfg.z_channels * height * width // f // f  # one copy, unpatchified
    output = item * cfg.out_channels * height * width if decode else latents
    # held throughout: the latents denormalised and unpatchified, or the images (a whole call's trace makes these)
    inputs = batch * (2 * latents if decode else item * cfg.in_channels * height * width)
    others = (batch - 1) * output  # the images done before the last
    return inputs + others + results + max(_traced_vae(cfg, dtype, 1, tile, tile, decode, fused), 2 * output)


@functools.lru_cache(maxsize=64)
def _traced_vae(cfg: AutoencoderConfig, dtype: torch.dtype, batch: int, height: int, width: int, decode: bool,
                fused: bool) -> int:  # fmt: skip
    with torch.device("meta"):
        vae = AutoEncoder(cfg).to(dtype)
    vae.set_attention(flash_attention_shapes if fused else attention_shapes)
    down = cfg.downscale  # pixels per latent (patchified) side

    def run() -> torch.Tensor:
        with torch.device("meta"):
            if decode:
                zp = torch.empty(batch, cfg.latent_channels, height // down, width // down, dtype=dtype)
                return vae.decode(zp)
            return vae.encode(torch.empty(batch, cfg.in_channels, height, width, dtype=dtype))

    return traced_work(run)


def text_encoder_work(config, dtype: torch.dtype, batch: int, spec: TextEncoderSpec) -> int:
    """Device bytes to keep for encoding `batch` prompts of `spec.max_length` tokens with a model of `config` (a
    transformers config, or `model.minilm.BertConfig`): the hidden states `spec` stacks and a layer's input and
    output, one layer's temporaries (attention projections, the MLP's gate, up and product, eager attention's scores
    or a fused kernel's mask, its MLP weight widened where it is stored packed or narrower) and the stacked output."""
    return work_reserve(text_encoder_bytes(config, dtype, batch, spec))


def text_encoder_bytes(config, dtype: torch.dtype, batch: int, spec: TextEncoderSpec) -> int:
    """The bytes of tensors such an encoding holds at most, counted from the model's shape."""
    hidden, length = config.hidden_size, spec.max_length
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    inner = getattr(config, "intermediate_size", 4 * hidden)
    row = batch * length * dtype.itemsize  # bytes per feature over all tokens
    states = (len(spec.layers) + 2) * row * hidden
    layer = row * (3 * inner + 2 * heads * head_dim + 2 * kv_heads * head_dim + 2 * hidden)
    eager = getattr(config, "_attn_implementation", None) in (None, "eager")
    scores = batch * (heads if eager else 1) * length * length * 4  # eager's fp32 scores; SDPA's kernels take the mask
    widened = inner * hidden * dtype.itemsize  # a packed or narrower MLP weight dequantized for its call
    return states + layer + scores + widened + 3 * row * hidden
