"""int8 / int4 weights that stay packed, GGUF files read and written, quantized files saved and loaded."""

import json
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flux2studio import load, sampling
from flux2studio import quantize as quantize_module
from flux2studio.quantize import (
    QuantLinear,
    dequantize_weight,
    fp8_linear,
    int8_linear,
    int8_weight_limit,
    prepack_int8,
    quantize_weight,
    row_bytes,
)

PROMPT, SIZE, STEPS, SEED = "a red circle", (64, 64), 2, 3


def _psnr(a, b) -> float:
    mse = ((np.asarray(a).astype(float) - np.asarray(b).astype(float)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_packed_rows_are_ggml_blocks_byte_for_byte(monkeypatch):
    """Our Q4_0 packing (the int4 mode) is ggml's, byte for byte; our unpacking of every GGUF block format
    (PyTorch, a few rows at a time: on any device, 1.7-2.2x faster than numpy on a CPU) equals the gguf package's
    dequantizer bit for bit, on real blocks and on random bytes; int8 rows are within half a step of the weights."""
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    ours = quantize_weight(w, "Q4_0")
    assert ours.shape == (48, row_bytes("Q4_0", 256))
    assert np.array_equal(ours.numpy(), gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0))
    for pieces in (1, 7):  # unpacked whole, and a few rows at a time (as large weights are): the same numbers
        monkeypatch.setattr(quantize_module, "UNPACK_ELEMENTS", 2**20 if pieces == 1 else 256 * 7)
        for fmt in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
            qtype = getattr(gguf.GGMLQuantizationType, fmt)
            packed = gguf.quants.quantize(w.numpy(), qtype)
            mine = dequantize_weight(torch.from_numpy(packed), fmt, 256, torch.float32)
            assert np.array_equal(mine.numpy(), gguf.quants.dequantize(packed, qtype).reshape(48, 256)), fmt
        for fmt in ("Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"):  # any bytes (gguf cannot make K blocks)
            qtype = getattr(gguf.GGMLQuantizationType, fmt)
            packed = np.random.default_rng(1).integers(0, 256, (48, row_bytes(fmt, 512)), dtype=np.uint8)
            packed &= 0xBF  # bit 6 off in every byte: each fp16 scale's exponent below 16 (finite)
            mine = dequantize_weight(torch.from_numpy(packed), fmt, 512, torch.float32)
            with np.errstate(all="ignore"):
                theirs = gguf.quants.dequantize(packed, qtype).reshape(48, 512)
            assert np.array_equal(mine.numpy(), theirs), fmt
    for fmt, step in (("Q4_1", 0.2), ("Q5_0", 0.1), ("Q5_1", 0.1)):
        packed = torch.from_numpy(gguf.quants.quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, fmt)))
        assert packed.shape == (48, row_bytes(fmt, 256))
        assert (dequantize_weight(packed, fmt, 256, torch.float32) - w).abs().mean() < step, fmt
    rows = quantize_weight(w, "int8")
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((dequantize_weight(rows, "int8", 256, torch.float32) - w).abs() <= step / 2 + 1e-6).all()


def test_the_int8_product_is_exact_on_this_cpu_and_close_to_float(monkeypatch):
    """`torch._int_mm` adds exactly for weights within `int8_weight_limit()` on this CPU (without VNNI it
    saturates int16 pairs beyond ±64, which the limit avoids); the layer is within 2% of the float product."""
    g = torch.Generator().manual_seed(1)
    limit = int8_weight_limit()
    a = torch.randint(-127, 128, (40, 512), dtype=torch.int8, generator=g)
    b = torch.randint(-limit, limit + 1, (512, 24), dtype=torch.int8, generator=g)
    assert torch.equal(torch._int_mm(a, b), (a.long() @ b.long()).int())
    w, x = torch.rand(24, 512, generator=g) - 0.5, torch.randn(3, 7, 512, generator=g)  # uniform: many ±127
    rows = quantize_weight(w, "int8")
    y = int8_linear(x, rows, 512, None)
    ref = x @ w.t()
    assert y.shape == ref.shape and ((y - ref).abs().mean() / ref.abs().mean()) < 0.02
    layer = QuantLinear(512, 24, False, "int8")  # resident: oneDNN's prepacked kernel, the same integer sums
    layer.weight.data = rows
    if prepack_int8(layer):
        assert torch.allclose(layer(x), y, rtol=1e-5, atol=1e-5)
    for kernel in ("int_mm", "onednn")[: 2 if _onednn_int8_runs() else 1]:  # streamed: either (`int8_kernel`)
        monkeypatch.setattr("flux2studio.quantize.int8_kernel", lambda kernel=kernel: kernel)
        assert torch.allclose(int8_linear(x, rows, 512, None), y, rtol=1e-5, atol=1e-5), kernel
    monkeypatch.undo()
    # what a CPU without VNNI runs (whatever this one has): weights halved to ±64, scale doubled
    monkeypatch.setattr("flux2studio.quantize.int8_weight_limit", lambda: 64)
    halved = int8_linear(x, rows, 512, None)
    assert ((halved - ref).abs().mean() / ref.abs().mean()) < 0.03
    assert torch.equal(halved, y) == (limit == 64)  # the path this CPU already takes when it lacks VNNI
    # the halving rounds half away from zero (symmetric: no bias), for every int8 value, within ±64
    every = torch.arange(-127, 128, dtype=torch.int8)
    packed = torch.cat([every.view(-1, 1).view(torch.uint8), torch.ones(255, 1).view(torch.uint8)], dim=1)
    half, scale = quantize_module._int8_weight(packed, 1)
    assert torch.equal(half.long().view(-1), torch.round(every.double() / 2 + every.sign() * 1e-9).long())
    assert half.abs().max() == 64 and torch.equal(scale, torch.full((255, 1), 2.0))


def _onednn_int8_runs() -> bool:
    """Whether this PyTorch has oneDNN's int8 op and it runs here (registered but raising on some builds)."""
    try:
        torch.ops.onednn.qlinear_prepack(torch.ones(8, 8, dtype=torch.int8), None)
    except (AttributeError, RuntimeError):
        return False
    return True


def test_cpus_without_vnni_multiply_int8_through_onednn_not_torch_int_mm(monkeypatch):
    """Without AVX512-VNNI or AMX, `torch._int_mm` is a plain loop (~55x slower than fp32 on a 2-core Zen 3):
    streamed int8 layers go through oneDNN's kernel there, the weight laid out for the call; with either,
    `torch._int_mm`. A PyTorch without oneDNN's int8 op keeps `torch._int_mm`."""
    features, limit = quantize_module.cpu_features(), quantize_module.int8_weight_limit()  # the real limit, cached
    has_op = _onednn_int8_runs()
    for vnni, amx, expected in ((False, False, "onednn" if has_op else "int_mm"), (True, False, "int_mm"),
                                (False, True, "int_mm")):  # fmt: skip
        monkeypatch.setattr(
            quantize_module, "cpu_features", lambda v=vnni, a=amx: features | {"avx512_vnni": v, "amx": a}
        )
        quantize_module._int8_kernel.cache_clear()
        assert quantize_module.int8_kernel() == expected, (vnni, amx)
    monkeypatch.undo()
    quantize_module._int8_kernel.cache_clear()
    vnni = features["avx512_vnni"] or features["amx"]
    assert quantize_module.int8_kernel() == ("int_mm" if vnni or not has_op else "onednn")
    assert quantize_module.int8_weight_limit() == limit
    # a layer its user compiles, in a fresh process (the compiler not imported before): compiled whole, no graph
    # break (the CPU's answers are constants without `constant_when_compiled`; the product an opaque op)
    code = (
        "import torch; from flux2studio.quantize import QuantLinear, quantize_weight; "
        "layer = QuantLinear(128, 64, True, 'int8'); x = torch.randn(2, 5, 128); layer.bias.data = torch.randn(64); "
        "layer.weight.data = quantize_weight(torch.randn(64, 128), 'int8'); "
        "y = torch.compile(layer, fullgraph=True, backend='eager')(x); print(torch.allclose(y, layer(x), 1e-5, 1e-5))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_fp8_layers_multiply_in_fp8_where_the_device_has_it_and_are_widened_elsewhere(monkeypatch):
    """`fp8` rows: e4m3 weights scaled per output channel. Where the device multiplies fp8 (CUDA 8.9+; the CPU
    stands in here: PyTorch runs `_scaled_mm` on it too) a layer is one fp8 product of per-token-scaled
    activations, equal to that arithmetic written out; elsewhere the weight is widened for the call. An fp8
    file's e4m3 weight with its per-tensor scale is packed byte for byte (the same weights, exactly)."""
    g = torch.Generator().manual_seed(2)
    w, x, bias = torch.randn(48, 64, generator=g), torch.randn(3, 5, 64, generator=g), torch.randn(48, generator=g)
    rows = quantize_weight(w, "fp8")
    assert rows.shape == (48, row_bytes("fp8", 64)) == (48, 68)
    dense = dequantize_weight(rows, "fp8", 64, torch.float32)
    assert ((dense - w).abs().max(dim=1).values / w.abs().max(dim=1).values).max() <= 1 / 16  # e4m3: 3 mantissa bits

    y = fp8_linear(x, rows, 64, bias)
    q, s = rows[:, :64].contiguous().view(torch.float8_e4m3fn).float(), rows[:, 64:].contiguous().view(torch.float32)
    flat = x.reshape(-1, 64)
    sx = flat.abs().amax(dim=1, keepdim=True) / 448
    xq = (flat / sx).to(torch.float8_e4m3fn).float()
    by_hand = ((xq @ q.t()) * sx * s.t()).to(torch.bfloat16) + bias.to(torch.bfloat16)
    assert y.dtype == x.dtype and torch.allclose(y.reshape(-1, 48), by_hand.float(), rtol=2**-7, atol=1e-2)
    ref = x @ w.t() + bias
    assert ((y - ref).norm() / ref.norm()) < 0.08

    layer = QuantLinear(64, 48, True, "fp8")
    layer.weight.data, layer.bias.data = rows, bias
    assert torch.equal(layer(x), torch.nn.functional.linear(x, dense, bias))  # a CPU: widened for the call
    monkeypatch.setattr(QuantLinear, "fp8_matmul", staticmethod(lambda device: True))
    assert torch.equal(layer(x), y)

    fp8_file = torch.nn.Sequential(torch.nn.Linear(64, 48))  # as an fp8 file loads: e4m3 data and its scale
    fp8_file[0].weight.data = (w / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
    fp8_file[0].weight.fp8_scale = torch.tensor(0.01)
    expected = fp8_file[0].weight.data.float() * 0.01
    assert quantize_module.quantize_modules(fp8_file, "fp8", lambda _: True) == {"0": "fp8"}
    assert torch.equal(fp8_file[0].dense(torch.float32), expected)


def _single_file(klein_folder, tmp_path):
    from test_loading import _single_files

    path, te, folder = _single_files(klein_folder, tmp_path, fp8=False)
    shutil.copytree(folder / "tokenizer", tmp_path / "te" / "tokenizer")
    for f in te.iterdir():
        shutil.copy(f, tmp_path / "te" / f.name)
    return path, tmp_path / "te"


def _run(weights, te, **kw):
    pipe = load("klein-4b", weights=weights, text_encoder=te, device="cpu", dtype="fp32", **kw)
    return pipe, pipe(PROMPT, size=SIZE, steps=STEPS, seed=SEED)[0]


def test_int8_int4_and_fp8_stay_packed_and_their_quality_is_measured(klein_folder, tmp_path, capsys, monkeypatch):
    """`--quantize int8|int4|fp8` packs the transformer's blocks and modulation layers and the text encoder's
    layers (1 / 0.56 / 1 byte a weight, kept so while they run); the image against fp32 on the tiny klein (random
    weights): int8 PSNR >= 30 dB (measured 33.4), int4 >= 15 dB (measured 19.5), fp8 widened per layer >= 27 dB
    (30.0), fp8 multiplied in fp8 as GPUs with fp8 units do >= 23 dB (26.2). The metadata says so."""
    path, te = _single_file(klein_folder, tmp_path)
    _, ref = _run(path, te)
    rows = []
    for mode, floor in (("int8", 30.0), ("int4", 15.0), ("fp8", 27.0)):
        pipe, img = _run(path, te, quantize=mode)
        qkv = pipe.transformer.double_blocks[0].img_attn.qkv
        assert isinstance(qkv, QuantLinear) and qkv.weight.dtype == torch.uint8
        assert qkv.fmt == {"int8": "int8", "int4": "Q4_0", "fp8": "fp8"}[mode]
        assert isinstance(pipe.transformer.double_stream_modulation_img.lin, QuantLinear)
        assert not isinstance(pipe.transformer.img_in, QuantLinear)  # input / output layers stay as they are
        assert pipe.transformer.double_blocks[0].img_attn.qkv.weight.dtype == torch.uint8  # still, after running
        encoder = pipe.text_encoder.model
        assert isinstance(encoder.layers[0].mlp.down_proj, QuantLinear)
        assert img.info and json.loads(img.info["flux2"])["quantize"] == mode
        diff = np.abs(np.asarray(img).astype(int) - np.asarray(ref).astype(int))
        rows.append(f"{mode}: max {diff.max()}, mean {diff.mean():.2f} levels, PSNR {_psnr(img, ref):.1f} dB")
        assert _psnr(img, ref) >= floor, rows[-1]
        if mode == "fp8":  # as a GPU with fp8 units runs it: one fp8 product a layer (`_scaled_mm`, here on the CPU)
            monkeypatch.setattr(QuantLinear, "fp8_matmul", staticmethod(lambda device: True))
            _, fast = _run(path, te, quantize=mode)
            monkeypatch.undo()
            rows.append(f"fp8 products: PSNR {_psnr(fast, ref):.1f} dB")
            assert _psnr(fast, ref) >= 23.0, rows[-1]
        if mode == "int8":  # resident (servers): oneDNN's prepacked kernel where PyTorch has it; same sums
            pipe, kept = _run(path, te, quantize=mode, resident=True)
            assert _psnr(kept, img) >= 35.0  # measured 39.1: scales applied in another order, amplified
            if torch.ops.onednn is not None and hasattr(torch.ops.onednn, "qlinear_prepack"):
                assert pipe.transformer.double_blocks[0].img_attn.qkv.onednn is not None
    with capsys.disabled():
        print("\nquality vs fp32, tiny klein:", "; ".join(rows))


def test_saved_quantized_files_load_without_requantizing(klein_folder, tmp_path):
    """`flux2 convert --quantize int8` writes a file that loads packed and gives the image of quantizing at load,
    bit for bit; a GGUF Q4_0 file (`--to gguf --quantize q4_0`) holds the same rows as `--quantize int4`
    and gives its image bit for bit; Q8_0 and F16 ones stay packed and run close to fp32.
    `flux2 info` describes them."""
    from flux2studio.cli import main

    path, te = _single_file(klein_folder, tmp_path)
    (tmp_path / "out").mkdir()
    shutil.copy(path.parent / "ae.safetensors", tmp_path / "out" / "ae.safetensors")
    q8 = tmp_path / "out" / "klein-int8.safetensors"
    assert main(["convert", str(path), str(q8), "--to", "bfl", "--quantize", "int8"]) == 0
    loaded, at_load = _run(path, te, quantize="int8")
    pipe, from_file = _run(q8, te, quantize="int8")  # (the flag packs the text encoder; the file is kept as is)
    packed = pipe.transformer.double_blocks[0].img_attn.qkv
    assert packed.fmt == "int8" and torch.equal(packed.weight, loaded.transformer.double_blocks[0].img_attn.qkv.weight)
    assert np.array_equal(np.asarray(at_load), np.asarray(from_file))

    q4 = tmp_path / "out" / "klein-Q4_0.gguf"
    assert main(["convert", str(path), str(q4), "--to", "gguf", "--quantize", "q4_0"]) == 0
    reader = gguf.GGUFReader(str(q4))
    assert reader.get_field("general.architecture").contents() == "flux"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["double_blocks.0.img_attn.qkv.weight"] == "Q4_0" and types["img_in.weight"] == "F32"
    _, int4 = _run(path, te, quantize="int4")
    pipe, gguf_img = _run(q4, te, quantize="int4")
    assert pipe.transformer.double_blocks[0].img_attn.qkv.fmt == "Q4_0"
    assert np.array_equal(np.asarray(int4), np.asarray(gguf_img))

    _, ref = _run(path, te)
    for fmt, floor in (("q8_0", 30.0), ("f16", 40.0)):  # F16 linear weights stay fp16 too, widened per layer
        file = tmp_path / "out" / f"klein-{fmt}.gguf"
        assert main(["convert", str(path), str(file), "--to", "gguf", "--quantize", fmt]) == 0
        pipe, img = _run(file, te)
        assert pipe.transformer.double_blocks[0].img_attn.qkv.fmt == fmt.upper()
        assert _psnr(img, ref) >= floor

    prefixed = tmp_path / "out" / "prefixed-Q4_0.gguf"  # as some community files name them
    _gguf(
        prefixed,
        "flux",
        {f"model.diffusion_model.{t.name}": (np.asarray(t.data), t.tensor_type) for t in reader.tensors},
    )
    pipe, img = _run(prefixed, te, quantize="int4")
    assert pipe.transformer.double_blocks[0].img_attn.qkv.fmt == "Q4_0"
    assert np.array_equal(np.asarray(img), np.asarray(gguf_img))

    info = __import__("flux2studio.conversion", fromlist=["describe"]).describe(q4)
    assert info["component"] == "transformer" and info["dtypes"]["Q4_0"] > 0 and info["transformer"]["depth"] >= 1
    back = tmp_path / "back.safetensors"  # a GGUF converts back to a plain (bf16) BFL file
    assert main(["convert", str(q4), str(back), "--to", "bfl"]) == 0
    assert load("klein-4b", weights=back, text_encoder=te, dtype="fp32").transformer is not None


def test_a_lora_on_a_packed_layer_runs_beside_it_and_comes_off_exactly(klein_folder, tmp_path):
    """A LoRA on a packed layer is applied as a hook: the layer stays packed (a fused copy would be 4-7x its
    size), and removing the LoRA gives the plain image back bit for bit."""
    path, te = _single_file(klein_folder, tmp_path)
    pipe, plain = _run(path, te, quantize="int8")
    qkv = pipe.transformer.double_blocks[0].img_attn.qkv
    before = qkv.weight.data.clone()
    name = "diffusion_model.double_blocks.0.img_attn.qkv"
    g = torch.Generator().manual_seed(0)
    lora = {f"{name}.lora_A.weight": torch.randn(4, qkv.in_features, generator=g),
            f"{name}.lora_B.weight": torch.randn(qkv.out_features, 4, generator=g)}  # fmt: skip
    save_file(lora, tmp_path / "lora.safetensors")
    pipe.set_loras([(tmp_path / "lora.safetensors", 0.5)])
    with_lora = pipe(PROMPT, size=SIZE, steps=STEPS, seed=SEED)[0]
    assert not np.array_equal(np.asarray(with_lora), np.asarray(plain))
    assert pipe.transformer.double_blocks[0].img_attn.qkv.weight.dtype == torch.uint8  # still packed
    pipe.set_loras([])
    assert torch.equal(pipe.transformer.double_blocks[0].img_attn.qkv.weight.data, before)
    again = pipe(PROMPT, size=SIZE, steps=STEPS, seed=SEED)[0]
    assert np.array_equal(np.asarray(again), np.asarray(plain))


def _gguf(path, arch: str, tensors: dict) -> None:
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_bad_quantization_input_gets_one_clear_error(klein_folder, tmp_path, capsys):
    from flux2studio.cli import main
    from flux2studio.quantized_files import read_weights

    with pytest.raises(ValueError, match=r"--quantize 'int3' is not one of int8, int4, fp8"):
        load("nano", quantize="int3")
    with pytest.raises(SystemExit):
        main(["generate", "x", "--quantize", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err

    for arch, what in (("gemma3", "not a FLUX.2 component"), ("llama", "text encoders")):
        other = tmp_path / f"{arch}.gguf"
        _gguf(other, arch, {"blk.0.attn_q.weight": (np.zeros((4, 32), np.float32), None)})
        with pytest.raises(ValueError, match=rf"{arch}.gguf is a GGUF of architecture '{arch}' \({what}\); FLUX.2 tr"):
            read_weights(other)
    q2k = tmp_path / "q2k.gguf"
    raw = np.zeros((4, 84), np.uint8)  # one Q2_K block (256 weights) a row
    _gguf(q2k, "flux", {"double_blocks.0.img_attn.qkv.weight": (raw, gguf.GGMLQuantizationType.Q2_K)})
    with pytest.raises(ValueError, match=r"quantization type Q2_K is not supported; supported: int8, fp8, F32, .*Q6_K"):
        read_weights(q2k)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(q2k.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"broken.gguf is not a readable GGUF file"):
        read_weights(broken)

    bad_meta = tmp_path / "bad.safetensors"
    save_file({"x.weight": torch.zeros(2, 36, dtype=torch.uint8)}, bad_meta, metadata={"flux2studio.quantized": "{"})
    with pytest.raises(ValueError, match=r"bad.safetensors: its flux2studio.quantized metadata is not valid JSON"):
        read_weights(bad_meta)
    save_file(
        {"x.weight": torch.zeros(2, 36, dtype=torch.uint8)},
        bad_meta,
        metadata={"flux2studio.quantized": '{"x": "Q3_K"}'},
    )
    with pytest.raises(ValueError, match=r"quantization type Q3_K is not supported"):
        read_weights(bad_meta)

    path, _ = _single_file(klein_folder, tmp_path)
    for args, message in (
        (["--to", "gguf", "--quantize", "int8"], "--quantize 'int8' with --to gguf: choose q8_0, q4_0, f16, bf16"),
        (["--to", "diffusers", "--quantize", "int4"], "--quantize 'int4' with --to diffusers: choose none"),
        (["--to", "bfl", "--quantize", "q4_0"], "--quantize 'q4_0' with --to bfl: choose int8, int4"),
    ):
        assert main(["convert", str(path), str(tmp_path / "x.out"), *args]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x.out").exists()

    def fail(*_a, **_k):
        raise OSError("disk full")

    dst = tmp_path / "half.gguf"
    original = gguf.GGUFWriter.write_tensor_data
    gguf.GGUFWriter.write_tensor_data = fail
    try:
        assert main(["convert", str(path), str(dst), "--to", "gguf", "--quantize", "q8_0"]) == 2
        assert "error: disk full" in capsys.readouterr().err
    finally:
        gguf.GGUFWriter.write_tensor_data = original
    assert not dst.exists() and not list(tmp_path.glob("half.gguf*"))  # nothing half-written left behind


def test_a_text_encoder_gguf_as_llama_cpp_writes_it_loads_with_its_own_tokenizer(klein_folder, tmp_path):
    """A Qwen3 text encoder as one GGUF file (`flux2 convert TE x.gguf --to gguf`: architecture "qwen3",
    llama.cpp's tensor names, the tokenizer and chat template in the header, as stable-diffusion.cpp and
    ComfyUI-GGUF users share them) loads with `--text-encoder x.gguf`. BF16: the same encoding as the folder in
    bf16, bit for bit (so the tokenizer rebuilt from the header tokenizes alike); Q8_0: its layers and token
    table stay packed and encode close to it. Later layers are never read; `flux2 info` describes it; given in
    each other's place, a transformer GGUF and a text encoder GGUF are refused by name."""
    from flux2studio.cli import main
    from flux2studio.conversion import describe
    from flux2studio.quantize import QuantEmbedding

    path, te = _single_file(klein_folder, tmp_path)
    files = {fmt: tmp_path / f"qwen3-{fmt}.gguf" for fmt in ("bf16", "q8_0")}
    for fmt, file in files.items():
        assert main(["convert", str(te), str(file), "--to", "gguf", "--quantize", fmt]) == 0
    reader = gguf.GGUFReader(str(files["q8_0"]))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert reader.get_field("general.architecture").contents() == "qwen3" and "output.weight" not in types
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["blk.27.ffn_down.weight"] == "Q8_0" and types["blk.0.attn_q_norm.weight"] == "F32"
    assert "<|im_start|>" in reader.get_field("tokenizer.chat_template").contents()

    prompts = ["a red circle", "a cat holding a sign that says hello world, photo, 35mm"]
    ref = load("klein-4b", weights=path, text_encoder=te, dtype="bf16").text_encoder(prompts)
    exact = load("klein-4b", weights=path, text_encoder=files["bf16"], dtype="bf16")
    assert type(exact.text_encoder.tokenizer).__name__ == "Qwen2Tokenizer"  # rebuilt from the header
    assert torch.equal(exact.text_encoder(prompts), ref)
    packed = load("klein-4b", weights=path, text_encoder=files["q8_0"], dtype="fp32").text_encoder
    stack = packed.model
    assert len(stack.layers) == 27  # klein takes layers 9, 18, 27: blk.27 is never read
    assert isinstance(stack.layers[0].self_attn.q_proj, QuantLinear) and stack.layers[0].self_attn.q_proj.fmt == "Q8_0"
    assert isinstance(stack.embed_tokens, QuantEmbedding) and stack.embed_tokens.weight.dtype == torch.uint8
    full = load("klein-4b", weights=path, text_encoder=te, dtype="fp32").text_encoder(prompts)
    error = ((packed(prompts) - full).norm() / full.norm()).item()
    print(
        f"\nQ8_0 text encoder GGUF vs the folder, fp32: relative error {error:.4f}; bf16 vs fp32 "
        f"{((ref.float() - full).norm() / full.norm()).item():.4f}"
    )
    assert error < 0.05, error

    info = describe(files["q8_0"])
    assert info["component"] == "text encoder" and info["text_encoder"]["config"]["num_hidden_layers"] == 28
    with pytest.raises(ValueError, match="is a text encoder, not a transformer: give it as --text-encoder"):
        load("klein-4b", weights=files["q8_0"], text_encoder=te)
    q4 = tmp_path / "klein-Q4_0.gguf"
    assert main(["convert", str(path), str(q4), "--to", "gguf", "--quantize", "q4_0"]) == 0
    with pytest.raises(ValueError, match="transformer GGUF, not a text encoder"):
        load("klein-4b", weights=path, text_encoder=q4)


def test_a_text_encoder_as_one_safetensors_file_as_comfyui_shares_it(klein_folder, tmp_path, monkeypatch):
    """A Qwen3 text encoder as one safetensors file with transformers' names and no config (ComfyUI's
    `qwen_3_4b.safetensors`; `..._fp8mixed`: e4m3 linear weights with a `weight_scale` and a `comfy_quant` marker
    each) loads with
    `--text-encoder FILE`: its config from the shapes, its tokenizer from a `tokenizer/` folder beside it or the
    Hugging Face cache (the model's repo). The folder's encoding bit for bit; fp8: kept fp8 and widened per layer,
    bit for bit the encoding of its weights widened up front. No tokenizer anywhere, or another file: one clear
    error each."""
    import huggingface_hub.constants

    from flux2studio.checkpoints import read_component, write_safetensors
    from flux2studio.conversion import describe

    path, te = _single_file(klein_folder, tmp_path)
    config = json.loads((te / "config.json").read_text())  # the tiny encoder given Qwen3's rope base, as a file's
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    (te / "config.json").write_text(json.dumps(config))
    prompts = ["a red circle", "a cat holding a sign that says hello world, photo, 35mm"]
    ref = load("klein-4b", weights=path, text_encoder=te, dtype="fp32").text_encoder(prompts)
    sd = read_component(te)
    comfy = tmp_path / "comfy"
    comfy.mkdir()
    write_safetensors(sd, comfy / "qwen_3_4b.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    no_tokenizer = r"holds no tokenizer and none was found .*download black-forest-labs/FLUX.2-klein-4B --include"
    with pytest.raises(FileNotFoundError, match=no_tokenizer):
        load("klein-4b", weights=path, text_encoder=comfy / "qwen_3_4b.safetensors")
    entry = tmp_path / "hub" / "models--Qwen--Qwen3-4B"  # klein-4b's text encoder repo, its tokenizer files only
    shutil.copytree(te / "tokenizer", entry / "snapshots" / "abc")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc")
    pipe = load("klein-4b", weights=path, text_encoder=comfy / "qwen_3_4b.safetensors", dtype="fp32")
    assert torch.equal(pipe.text_encoder(prompts), ref) and len(pipe.text_encoder.model.layers) == 27

    fp8, widened = {}, {}  # the fp8 file, and a folder of its weights widened as the reference does: w.float() * scale
    for key, w in sd.items():
        fp8[key] = widened[key] = w
        if key.startswith("model.layers.") and key.endswith("proj.weight"):
            scale = w.abs().max().float() / 448
            fp8[key] = (w.float() / scale).to(torch.float8_e4m3fn)
            layer = key.removesuffix(".weight")
            fp8[layer + ".weight_scale"], fp8[layer + ".input_scale"] = scale, torch.ones(())
            fp8[layer + ".comfy_quant"] = _json_bytes({"format": "float8_e4m3fn"})  # ComfyUI's layer marker
            widened[key] = fp8[key].float() * scale
    write_safetensors(fp8, comfy / "qwen_3_4b_fp8mixed.safetensors")
    shutil.copytree(te, tmp_path / "widened")
    for shard in (tmp_path / "widened").glob("*.safetensors*"):
        shard.unlink()
    write_safetensors(widened, tmp_path / "widened" / "model.safetensors")
    shutil.copytree(te / "tokenizer", comfy / "tokenizer")  # beside the file
    encoder = load("klein-4b", weights=path, text_encoder=comfy / "qwen_3_4b_fp8mixed.safetensors", dtype="fp32")
    encoder = encoder.text_encoder
    assert encoder.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn  # kept, widened per layer
    expected = load("klein-4b", weights=path, text_encoder=tmp_path / "widened", dtype="fp32").text_encoder(prompts)
    assert torch.equal(encoder(prompts), expected)

    fp8["model.layers.0.mlp.up_proj.comfy_quant"] = _json_bytes({"format": "svdquant_w4a4"})
    write_safetensors(fp8, comfy / "qwen_3_4b_svdq.safetensors")
    with pytest.raises(ValueError, match=r"layer model.layers.0.mlp.up_proj is in ComfyUI's 'svdquant_w4a4' format"):
        load("klein-4b", weights=path, text_encoder=comfy / "qwen_3_4b_svdq.safetensors")("a red circle")
    info = describe(comfy / "qwen_3_4b.safetensors")
    assert info["component"] == "text encoder" and info["text_encoder"]["config"]["num_hidden_layers"] == 28

    write_safetensors({"model.embed_tokens.weight": sd["model.embed_tokens.weight"]}, comfy / "other.safetensors")
    with pytest.raises(ValueError, match="not a Qwen3 or Mistral text encoder with transformers' names"):
        load("klein-4b", weights=path, text_encoder=comfy / "other.safetensors")


def test_a_mistral_text_encoder_as_one_safetensors_file(tmp_path):
    """dev's Mistral text encoder as ComfyUI shares it (one file, its text stack under `model.`, no config, no
    vision tower): Mistral-Small's head size (128) and rope base (1e9), the rest from the shapes; it encodes as
    its folder does, bit for bit."""
    from flux2studio.checkpoints import read_component, write_safetensors
    from flux2studio.loading import hf_text_encoder
    from tiny import MISTRAL_SPEC, MISTRAL_TEMPLATE, mistral3, tokenizer

    model = mistral3(hidden=64, head_dim=128)
    model.config.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 1e9}
    model.config.text_config.rms_norm_eps = 1e-5
    model.save_pretrained(tmp_path / "te")
    tokenizer(MISTRAL_TEMPLATE).save_pretrained(tmp_path / "tokenizer")
    prompts = ["a red circle", "a cat holding a sign that says hello world, photo, 35mm"]
    ref = hf_text_encoder(MISTRAL_SPEC, tmp_path / "te", tmp_path / "tokenizer", "cpu", torch.float32)(prompts)
    stack = ("model.language_model.", "language_model.model.")  # (transformers saves the second)
    text = {"model." + k.removeprefix(p): v for k, v in read_component(tmp_path / "te").items()
            for p in stack if k.startswith(p)}  # fmt: skip
    assert len(text) > 10
    write_safetensors(text, tmp_path / "mistral_3_small_flux2_bf16.safetensors")
    one = hf_text_encoder(MISTRAL_SPEC, tmp_path / "mistral_3_small_flux2_bf16.safetensors", tmp_path / "tokenizer",
                          "cpu", torch.float32)  # fmt: skip
    assert type(one.model).__name__ == "MistralModel" and torch.equal(one(prompts), ref)


def _json_bytes(value: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)


def test_a_resident_int8_model_compiles():
    """`--compile` with int8 layers kept in memory: the compiled blocks call oneDNN's prepacked kernel as an opaque
    op (traced as the plain op, Inductor stopped with an error) and share their compiled graph; the output
    matches the eager int8 one."""
    from flux2studio.pipeline import compile_blocks

    model = load("nano", device="cpu", dtype="fp32", quantize="int8", resident=True).transformer
    model.double_blocks = torch.nn.ModuleList()  # one graph to compile (the single blocks'), the same int8 layers
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not all(m.onednn is not None for m in layers):
        pytest.fail("this PyTorch has no oneDNN int8 kernel (torch.ops.onednn.qlinear_prepack)")
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, 16, 128, generator=g), torch.randn(1, 8, model.cfg.context_dim, generator=g)
    args = (img, sampling.image_ids(4, 4), txt, sampling.text_ids(8), torch.tensor([0.5]))
    want = model(*args)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_blocks(model)
    got = model(*args)
    assert model.compiled and all(m.onednn is not None for m in layers)  # the prepacked copies stay in use
    # one graph for the blocks, one for the last (it returns the image tokens only): not one per block
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2 < len(model.single_blocks)
    # fused float ops round differently, so a token's int8 value may flip by one: close, not equal
    assert ((got - want).abs().mean() / want.abs().mean()) < 0.02


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page residency is read from /proc (Linux)")
def test_prepacked_int8_layers_hand_back_their_file_pages(tmp_path):
    """A resident int8 layer from a saved int8 file is held once: after oneDNN's copy is made, the rows' pages
    of the mapped file go back to the OS (read again only if a dense weight is rebuilt); it computes the same."""
    from flux2studio.checkpoints import read_safetensors
    from flux2studio.quantize import prepack_int8
    from flux2studio.residency import prefault
    from test_loading import _mapped_kb

    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 1024, generator=g)
    save_file({"w": quantize_weight(w, "int8")}, str(tmp_path / "layer.safetensors"))
    layer = QuantLinear(1024, 512, bias=False, fmt="int8")
    layer.weight.data = read_safetensors(tmp_path / "layer.safetensors")["w"]  # memory-mapped rows
    prefault(layer)
    size_kb = (tmp_path / "layer.safetensors").stat().st_size // 1024
    assert _mapped_kb(tmp_path) > 0.9 * size_kb
    x = torch.randn(2, 16, 1024, generator=g)
    with torch.no_grad():
        want = layer(x)  # torch._int_mm on the rows
        if prepack_int8(layer) != 1:
            pytest.fail("this PyTorch has no oneDNN int8 kernel (torch.ops.onednn.qlinear_prepack)")
        assert _mapped_kb(tmp_path) < 0.1 * size_kb
        got = layer(x)
        assert _mapped_kb(tmp_path) < 0.1 * size_kb  # the prepacked product does not read the rows
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the same int32 sums, scaled in another order
        assert torch.equal(layer.dense(torch.float32), dequantize_weight(quantize_weight(w, "int8"), "int8", 1024,
                                                                         torch.float32))  # fmt: skip


def test_a_gguf_with_diffusers_names_is_refused_at_load_and_converts(tmp_path):
    """Quantized blocks with diffusers names cannot run packed: said at load, naming the file and the command that
    rewrites it (was said when the transformer loaded, after the text encoder ran)."""
    from tiny import TRANSFORMER, diffusers_transformer

    q8 = gguf.GGMLQuantizationType.Q8_0
    plain = {k: v.float().numpy() for k, v in diffusers_transformer(TRANSFORMER).state_dict().items()}
    tensors = {k: ((gguf.quants.quantize(a, q8), q8) if a.ndim == 2 and a.shape[1] % 32 == 0 else (a, None))
               for k, a in plain.items()}  # fmt: skip
    _gguf(tmp_path / "d.gguf", "flux", tensors)
    with pytest.raises(ValueError, match=r"d\.gguf is quantized \(Q8_0\) with diffusers tensor names.*flux2 convert"):
        load("klein-4b", weights=tmp_path / "d.gguf", vae=tmp_path / "absent.safetensors")
    from flux2studio.conversion import convert, describe

    said = convert(tmp_path / "d.gguf", tmp_path / "bfl.gguf", to="gguf", quantize="q8_0")  # what the message says
    assert describe(tmp_path / "bfl.gguf")["layout"] == "single file (bfl names)" and "note" not in said
    said = convert(tmp_path / "bfl.gguf", tmp_path / "q4.gguf", to="gguf", quantize="q4_0")  # errors that add up
    assert "note: bfl.gguf was stored as Q8_0: its weights, unpacked, were rounded again to Q4_0" in said
