"""Transformer parity with diffusers 0.42.1 `Flux2Transformer2DModel` on tiny random configs (fp32)."""

import dataclasses

import pytest
import torch
from diffusers.models.transformers.transformer_flux2 import (
    Flux2KVAttnProcessor,
    Flux2KVParallelSelfAttnProcessor,
)

from flux2studio.layouts.transformer import transformer_from_diffusers, transformer_to_diffusers
from flux2studio.model import transformer as transformer_module
from flux2studio.model.transformer import Flux2Transformer
from flux2studio.pipeline import allow_split_projection
from flux2studio.sampling import image_ids, reference_ids, text_ids
from flux2studio.variants import TransformerConfig
from tiny import diffusers_transformer

# fp32 forward of a 3-block model: differences come only from summation order (fused qkv vs three
# matmuls, separate reference pass). Measured max abs diff ~1e-6; bound 1e-5.
TOL = 1e-5

TINY = TransformerConfig(
    hidden_size=64,
    num_heads=2,
    depth=2,
    depth_single=2,
    context_dim=48,
    axes_dim=(8, 8, 8, 8),
    guidance_embed=True,
)


def _pair(cfg: TransformerConfig, seed: int = 0):
    ref = diffusers_transformer(cfg, seed)
    ours = Flux2Transformer(cfg).eval()
    ours.load_state_dict(transformer_from_diffusers(ref.state_dict()), strict=True)
    return ref, ours


def _inputs(cfg, b=2, h=3, w=5, n_txt=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, h * w, cfg.in_channels, generator=g)
    txt = torch.randn(b, n_txt, cfg.context_dim, generator=g)
    t = torch.tensor([0.9, 0.35])[:b]
    return img, image_ids(h, w), txt, text_ids(n_txt), t


@pytest.mark.parametrize("guidance_embed", [True, False])
@pytest.mark.parametrize("token_chunk", [512, 4])  # 4: MLPs run in several token chunks (as at 1024x1024)
def test_forward_matches_diffusers(guidance_embed, token_chunk, monkeypatch):
    monkeypatch.setattr(transformer_module, "TOKEN_CHUNK", token_chunk)
    cfg = dataclasses.replace(TINY, guidance_embed=guidance_embed)
    ref, ours = _pair(cfg)
    allow_split_projection(ours)  # as the pipeline does: the rows-apart path
    assert all(b.split_linear1 for b in ours.single_blocks)
    img, img_ids, txt, txt_ids, t = _inputs(cfg)
    guidance = torch.tensor([4.0, 2.5]) if guidance_embed else None
    with torch.no_grad():
        expected = ref(
            hidden_states=img,
            encoder_hidden_states=txt,
            timestep=t,
            img_ids=img_ids[None].expand(2, -1, -1),
            txt_ids=txt_ids[None].expand(2, -1, -1),
            guidance=guidance,
            return_dict=False,
        )[0]
        got = ours(img, img_ids, txt, txt_ids, t, guidance)
    # GEMMs over 4-row chunks take other fp32 kernels (other summation order): relative 1e-6 measured
    tol = TOL if token_chunk == 512 else TOL * expected.abs().max().item()
    assert (got - expected).abs().max().item() <= tol


def test_training_forward_equals_inference_forward(monkeypatch):
    """With autograd on (training, LoRA adapters) blocks take the plain fused path: same numbers."""
    monkeypatch.setattr(transformer_module, "TOKEN_CHUNK", 4)
    _, ours = _pair(TINY)
    allow_split_projection(ours)
    img, img_ids, txt, txt_ids, t = _inputs(TINY)
    guidance = torch.tensor([4.0, 2.5])
    with torch.no_grad():
        fast = ours(img, img_ids, txt, txt_ids, t, guidance)
    plain = ours(img, img_ids, txt, txt_ids, t, guidance)
    assert plain.requires_grad
    assert (fast - plain.detach()).abs().max().item() <= TOL * plain.abs().max().item()


def test_a_hook_on_the_fused_projection_turns_the_split_off():
    """A hook around linear1 (a LoRA's, a widening one) makes the block call it whole, so the hook counts."""
    _, ours = _pair(TINY)
    img, img_ids, txt, txt_ids, t = _inputs(TINY)
    guidance = torch.tensor([4.0, 2.5])
    with torch.no_grad():
        before = ours(img, img_ids, txt, txt_ids, t, guidance)
        handle = ours.single_blocks[0].linear1.register_forward_hook(lambda _m, _a, out: out * 1.5)
        allow_split_projection(ours)
        assert not ours.single_blocks[0].split_linear1 and ours.single_blocks[1].split_linear1
        hooked = ours(img, img_ids, txt, txt_ids, t, guidance)
        handle.remove()
        allow_split_projection(ours)
        assert ours.single_blocks[0].split_linear1
        again = ours(img, img_ids, txt, txt_ids, t, guidance)
    assert (hooked - before).abs().max() > 1e-3  # the hook was applied
    assert (again - before).abs().max().item() <= TOL * before.abs().max().item()


def test_forward_with_references_matches_diffusers():
    cfg = dataclasses.replace(TINY, guidance_embed=False)
    ref, ours = _pair(cfg)
    img, img_ids, txt, txt_ids, t = _inputs(cfg)
    g = torch.Generator().manual_seed(3)
    refs = [torch.randn(2, 128, 2, 4, generator=g), torch.randn(2, 128, 3, 2, generator=g)]
    ref_tokens = torch.cat([r.flatten(2).transpose(1, 2) for r in refs], dim=1)
    ref_ids = reference_ids([r.shape[-2:] for r in refs])
    x = torch.cat([img, ref_tokens], dim=1)
    ids = torch.cat([img_ids, ref_ids])
    with torch.no_grad():
        expected = ref(
            hidden_states=x,
            encoder_hidden_states=txt,
            timestep=t,
            img_ids=ids[None].expand(2, -1, -1),
            txt_ids=txt_ids[None].expand(2, -1, -1),
            return_dict=False,
        )[0]
        got = ours(x, ids, txt, txt_ids, t)
    assert (got[:, : img.shape[1]] - expected[:, : img.shape[1]]).abs().max().item() <= TOL


def test_reference_kv_cache_matches_diffusers_extract_and_cached():
    cfg = dataclasses.replace(TINY, guidance_embed=False)
    ref, ours = _pair(cfg)
    for block in ref.transformer_blocks:  # what Flux2KleinKVPipeline sets up
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in ref.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    img, img_ids, txt, txt_ids, t = _inputs(cfg)
    g = torch.Generator().manual_seed(4)
    ref_lat = torch.randn(2, 6, 128, generator=g)
    r_ids = reference_ids([(2, 3)])
    common = dict(encoder_hidden_states=txt, txt_ids=txt_ids[None].expand(2, -1, -1), return_dict=False)
    with torch.no_grad():
        # diffusers: step 0 runs [ref; img] in "extract" mode, later steps reuse the cache.
        first, cache = ref(
            hidden_states=torch.cat([ref_lat, img], dim=1),
            img_ids=torch.cat([r_ids, img_ids])[None].expand(2, -1, -1),
            timestep=t,
            kv_cache_mode="extract",
            num_ref_tokens=ref_lat.shape[1],
            **common,
        )
        later = ref(
            hidden_states=img,
            img_ids=img_ids[None].expand(2, -1, -1),
            timestep=t * 0.5,
            kv_cache=cache,
            kv_cache_mode="cached",
            **common,
        )[0]
        kv = ours.ref_kv(ref_lat, r_ids, torch.zeros(2))
        got_first = ours(img, img_ids, txt, txt_ids, t, ref_kv=kv)
        got_later = ours(img, img_ids, txt, txt_ids, t * 0.5, ref_kv=kv)
    assert (got_first - first).abs().max().item() <= TOL
    assert (got_later - later).abs().max().item() <= TOL


def test_key_table_round_trip_is_exact():
    ref, _ = _pair(TINY)
    sd = ref.state_dict()
    back = transformer_to_diffusers(transformer_from_diffusers(sd))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_unknown_key_is_named():
    ref, _ = _pair(TINY)
    sd = dict(ref.state_dict(), **{"transformer_blocks.0.attn.surprise.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="surprise"):
        transformer_from_diffusers(sd)
