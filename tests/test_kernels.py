"""The bf16 CPU attention kernel (kernels/attention.c): same arithmetic as PyTorch's SDPA, rounding apart.

bf16 attention has no single exact answer: PyTorch's flash kernel and ours both keep scores, softmax and sums in
fp32 and round probabilities and outputs to bf16, in different orders. So the bound is against the fp32 result:
our error must be no larger than SDPA's own (measured: max 0.0155 vs 0.0159 at (1, 24, 1536, 128), means within
2%), and ours minus SDPA at most one or two bf16 steps of the output.
"""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from flux2studio.kernels.attention import (
    attention_for,
    cpu_bf16_attention,
    cpu_has_avx512_bf16,
    unavailable_reason,
)
from flux2studio.model.autoencoder import AutoEncoder
from flux2studio.model.transformer import Flux2Transformer
from flux2studio.sampling import image_ids, text_ids
from tiny import TRANSFORMER, VAE, randomize_

HAS_CPU = cpu_has_avx512_bf16()


def qkv(b, h, lq, lk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, n, d, generator=g) * 3 for n in (lq, lk))  # peaked softmax, as in trained models
    return q.bfloat16(), k.bfloat16(), torch.randn(b, h, lk, d, generator=g).bfloat16()


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    if not HAS_CPU:  # the kernel's tests need the instructions; what must hold without them is the fallback
        assert unavailable_reason(cache) == "this CPU has no AVX512-BF16"
        assert attention_for("auto", torch.device("cpu"), torch.bfloat16, cache) is F.scaled_dot_product_attention
        pytest.skip("this CPU lacks AVX512-BF16: checked that SDPA is used instead")
    assert unavailable_reason(cache) is None  # built with the system compiler
    assert len(list((cache / "kernels").glob("attention-*.so"))) == 1
    return cpu_bf16_attention(cache)


@pytest.mark.parametrize(
    "shape",
    # odd lengths, batches, one key, one query, one head (query rows split between threads), wide heads
    [
        (1, 3, 37, 53, 32),
        (2, 2, 100, 77, 64),
        (1, 24, 600, 600, 128),
        (1, 2, 5, 1, 16),
        (3, 1, 1, 300, 48),
        (1, 1, 203, 190, 64),
        (1, 1, 64, 64, 512),
    ],
)
def test_kernel_error_is_no_larger_than_sdpa(kernel, shape):
    q, k, v = qkv(*shape)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    sdpa = F.scaled_dot_product_attention(q, k, v).double()
    ours = kernel(q, k, v)
    assert ours.shape == sdpa.shape and ours.dtype == torch.bfloat16
    ours = ours.double()
    err_sdpa, err_ours = (sdpa - exact).abs(), (ours - exact).abs()
    assert err_ours.max() <= 1.25 * err_sdpa.max() + 1e-6
    assert err_ours.mean() <= 1.1 * err_sdpa.mean() + 1e-7
    # one output rounding apart at most twice over: |out| < 4 here, a bf16 step at 4 is 2^-5
    assert (ours - sdpa).abs().max() <= 2**-4


def test_kernel_reads_strided_inputs(kernel):
    """Views as the transformer makes them: v straight from a fused qkv projection, q without its first rows."""
    x = torch.randn(2, 70, 3 * 4 * 32).bfloat16()
    q, k, v = x.unflatten(-1, (3, 4, 32)).permute(2, 0, 3, 1, 4)  # (B, H, L, Dh) views, token stride 384
    q = q[:, :, 9:]
    assert not v.is_contiguous()
    ours = kernel(q, k, v)
    ref = kernel(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(ours, ref)
    assert ours.transpose(1, 2).is_contiguous()  # (B, L, H, Dh) memory: the caller's flatten(2) copies nothing


@pytest.mark.parametrize("shape", [(1, 24, 200, 200, 64), (1, 1, 300, 300, 512), (3, 1, 50, 70, 32)])
def test_any_thread_count_gives_the_same_bits(kernel, shape):
    """Heads split between threads, and a head's queries split when there are few heads: the bits never change."""
    q, k, v = qkv(*shape)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3, 7, 16):
            torch.set_num_threads(n)
            outs.append(kernel(q, k, v))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_nan_propagates_as_in_sdpa(kernel):
    q, k, v = qkv(1, 2, 40, 40, 32)
    k[0, 1, 7, 3] = float("nan")  # every score of head 1 with key 7 is NaN: all of head 1's rows are NaN
    ours, ref = kernel(q, k, v), F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(ours.isnan(), ref.isnan()) and ours[0, 1].isnan().all() and not ours[0, 0].isnan().any()


def test_what_the_kernel_does_not_take_runs_sdpa(kernel):
    q, k, v = qkv(1, 2, 20, 20, 32)
    empty = (q[:0], k[:0], v[:0])  # batch 0
    flat = torch.cat([torch.zeros(1, dtype=torch.bfloat16), q.flatten()])
    odd = flat[1:].view(q.shape)  # a storage offset of one element: rows are not 4-byte aligned
    assert odd.data_ptr() % 4
    assert torch.equal(kernel(odd, k, v), F.scaled_dot_product_attention(odd, k, v))
    for args in [(q.float(), k.float(), v.float()), (q[..., :24], k[..., :24], v[..., :24]), empty]:  # fp32, Dh 24
        assert torch.equal(kernel(*args), F.scaled_dot_product_attention(*args))
    with torch.enable_grad():  # training: SDPA, which has a backward
        qg = q.clone().requires_grad_()
        out = kernel(qg, k, v)
        assert torch.equal(out, F.scaled_dot_product_attention(qg, k, v))
        out.float().sum().backward()
        assert qg.grad is not None


def test_modes_and_fallbacks(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    assert attention_for("sdpa", cpu, torch.bfloat16, tmp_path) is F.scaled_dot_product_attention
    assert attention_for("auto", cpu, torch.float32, tmp_path) is F.scaled_dot_product_attention
    with pytest.raises(ValueError, match="attention 'flash': choose one of auto, sdpa, kernel"):
        attention_for("flash", cpu, torch.bfloat16, tmp_path)
    with pytest.raises(ValueError, match="attention 'kernel' runs bf16 on the CPU, not float32 on cpu"):
        attention_for("kernel", cpu, torch.float32, tmp_path)
    monkeypatch.setenv("CC", "no-such-compiler")
    no_cc = tmp_path / "no-cc"
    reason = "no-such-compiler" if HAS_CPU else "AVX512-BF16"
    assert reason in unavailable_reason(no_cc)
    assert attention_for("auto", cpu, torch.bfloat16, no_cc) is F.scaled_dot_product_attention
    with pytest.raises(RuntimeError, match=f"the CPU attention kernel is not available: .*{reason}"):
        attention_for("kernel", cpu, torch.bfloat16, no_cc)
    if HAS_CPU:  # a cache folder that cannot be written (here: a file where the folder should be)
        (tmp_path / "ro").write_text("")
        monkeypatch.delenv("CC")
        assert "ro" in unavailable_reason(tmp_path / "ro")
        assert attention_for("auto", cpu, torch.bfloat16, tmp_path / "ro") is F.scaled_dot_product_attention


def test_transformer_in_bf16_is_as_close_to_fp32_with_the_kernel_as_with_sdpa(kernel):
    """A whole tiny transformer (double and single blocks, 64 image + 24 text tokens) in bf16."""
    cfg = dataclasses.replace(TRANSFORMER, guidance_embed=False)
    model = randomize_(Flux2Transformer(cfg)).eval()
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(2, 64, cfg.in_channels, generator=g), torch.randn(2, 24, cfg.context_dim, generator=g)
    img_ids, txt_ids, t = image_ids(8, 8), text_ids(24), torch.tensor([0.7, 0.3])
    with torch.no_grad():
        exact = model.double()(img.double(), img_ids, txt.double(), txt_ids, t)
        model.bfloat16()
        out = {}
        for name, fn in (("sdpa", F.scaled_dot_product_attention), ("kernel", kernel)):
            model.sdpa = fn
            out[name] = model(img.bfloat16(), img_ids, txt.bfloat16(), txt_ids, t).double()
    err = {name: (o - exact).abs() for name, o in out.items()}
    assert err["kernel"].max() <= 1.25 * err["sdpa"].max()
    assert err["kernel"].mean() <= 1.1 * err["sdpa"].mean()
    assert not torch.equal(out["kernel"], out["sdpa"])  # the kernel did run


def test_vae_in_bf16_is_as_close_to_fp64_with_the_kernel_as_with_sdpa(kernel):
    """The VAE's mid-block attention: one head as wide as the channels, one token per latent pixel."""
    vae = randomize_(AutoEncoder(VAE)).eval()
    x = torch.rand(2, 3, 96, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        vae.double()
        z = vae.encode(x.double())
        exact = vae.decode(z)
        vae.bfloat16()
        out = {}
        for name, fn in (("sdpa", F.scaled_dot_product_attention), ("kernel", kernel)):
            vae.set_attention(fn)
            out[name] = vae.decode(z.bfloat16()).double()
    err = {name: (o - exact).abs() for name, o in out.items()}
    assert err["kernel"].max() <= 1.25 * err["sdpa"].max()
    assert err["kernel"].mean() <= 1.1 * err["sdpa"].mean()
    assert not torch.equal(out["kernel"], out["sdpa"])  # the kernel did run


def test_pipeline_uses_the_kernel_for_bf16_and_records_it(kernel):
    from flux2studio.loading import load

    def used(pipe) -> str:
        return json.loads(pipe("a red circle", seed=0)[0].info["flux2"])["attention"]

    pipe = load("nano", device="cpu", dtype="bf16")
    assert pipe.attention == "kernel" and pipe.transformer.sdpa is not F.scaled_dot_product_attention
    assert pipe.vae.decoder.mid.attn_1.sdpa is pipe.transformer.sdpa
    assert used(pipe) == "kernel"
    assert used(load("nano", device="cpu", dtype="bf16", attention="sdpa")) == "sdpa"
    assert used(load("nano", device="cpu", dtype="fp32")) == "sdpa"
