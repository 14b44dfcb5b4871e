"""ComfyUI's packed formats, nvfp4 and mxfp8 (BFL's flux-2-klein-*-nvfp4 files, Comfy-Org's fp4mixed text
encoders): read with their bytes kept packed and unpacked as comfy-kitchen (ComfyUI's kernel library, which
writes them) unpacks them, bit for bit. comfy-kitchen writes the files here and is the reference."""

import json
import shutil

import comfy_kitchen as ck
import numpy as np
import pytest
import torch
from comfy_kitchen.float_utils import to_blocked
from comfy_kitchen.tensor import TensorCoreMXFP8Layout, TensorCoreNVFP4Layout, TensorWiseINT8Layout
from safetensors.torch import save_file

from flux2studio import load
from flux2studio.checkpoints import read_safetensors, strip_prefix
from flux2studio.quantize import QuantLinear, dense_weight, int8_weight_limit
from flux2studio.quantized_files import unblocked, unpack_comfy

LAYOUTS = {"nvfp4": TensorCoreNVFP4Layout, "mxfp8": TensorCoreMXFP8Layout, "int8": TensorWiseINT8Layout}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _packed(w: torch.Tensor, fmt: str, prefix: str, **options) -> dict[str, torch.Tensor]:
    """A weight as ComfyUI saves a quantized layer: comfy-kitchen's tensors under `weight`, `weight_scale`...,
    and the layer's `comfy_quant` marker (`options`: int8's per_channel, convrot, convrot_groupsize)."""
    with ck.registry.use_backend("eager"):
        layout = LAYOUTS[fmt]
        parts = layout.state_dict_tensors(*layout.quantize(w, **options))
    conf = {k: v for k, v in options.items() if k.startswith("convrot") or k == "nested"}
    options = {k: v for k, v in options.items() if k != "nested"}
    marker = _marker("int8_tensorwise" if fmt == "int8" else fmt, **conf)
    return {f"{prefix}.weight{k}": v for k, v in parts.items()} | {f"{prefix}.comfy_quant": marker}


def _marker(fmt: str, **conf) -> torch.Tensor:
    """A layer's `comfy_quant` marker; `conf` (int8's convrot settings) under "params" where it holds "nested"."""
    nested = conf.pop("nested", False)
    return torch.tensor(list(json.dumps({"format": fmt, **({"params": conf} if nested else conf)}).encode()),
                        dtype=torch.uint8)  # fmt: skip


def _reference(sd: dict[str, torch.Tensor], layer: str, fmt: str, dtype: torch.dtype, **options) -> torch.Tensor:
    """The weight comfy-kitchen unpacks from a layer's tensors, in `dtype` (ComfyUI's compute dtype)."""
    with ck.registry.use_backend("eager"):
        if fmt == "int8":
            params = TensorWiseINT8Layout.Params(scale=sd[f"{layer}.weight_scale"], orig_dtype=dtype,
                                                 orig_shape=tuple(sd[f"{layer}.weight"].shape),
                                                 convrot=options.get("convrot", False),
                                                 convrot_groupsize=options.get("convrot_groupsize", 256))  # fmt: skip
            return TensorWiseINT8Layout.dequantize(sd[f"{layer}.weight"], params)
        if fmt == "nvfp4":
            return ck.dequantize_nvfp4(sd[f"{layer}.weight"], sd[f"{layer}.weight_scale_2"],
                                       sd[f"{layer}.weight_scale"], dtype)  # fmt: skip
        return ck.dequantize_mxfp8(sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"], dtype)


def test_comfyui_int8_layers_plain_and_rotated_multiply_in_int8_as_comfy_kitchen_does():
    """ComfyUI's int8 (one scale a row or one a tensor; "convrot": each group of 256 / 64 inputs rotated by a
    Hadamard matrix before quantizing) kept as the file has it: the weight wanted whole is comfy-kitchen's, rotated
    back, bit for bit; the layer rotates its input alike and multiplies in int8 with per-token activations, as
    comfy-kitchen's int8 product does: its output to 1e-5 where this CPU's int8 kernel takes weights up to 127
    (the same integer product); where it takes 64 (no VNNI: weights halved, `int8_weight_limit`) within 4% of the
    whole weight's product (measured 2.6%; comfy-kitchen's own there is 12% off: torch's int8 product saturates)."""
    import dataclasses

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 512, generator=g)
    for options in ({"per_channel": True}, {}, {"per_channel": True, "convrot": True, "convrot_groupsize": 256},
                    {"per_channel": True, "convrot": True, "convrot_groupsize": 64}):  # fmt: skip
        w = torch.randn(96, 512, generator=g) * 0.05
        sd = _packed(w, "int8", "layer", **options)
        fmt = f"comfy-int8-rot{options['convrot_groupsize']}" if "convrot" in options else "comfy-int8"
        ours, formats = unpack_comfy({k: v for k, v in sd.items() if "comfy" not in k}, {"layer": fmt}, "t")
        layer = QuantLinear(512, 96, False, formats["layer"])
        layer.load_state_dict({k.removeprefix("layer."): v for k, v in ours.items()}, assign=True)
        assert layer.weight.data_ptr() == sd["layer.weight"].data_ptr()  # the file's bytes
        with ck.registry.use_backend("eager"):
            q, params = TensorWiseINT8Layout.quantize(w, **options)
            for dtype in DTYPES:
                expected = TensorWiseINT8Layout.dequantize(q, dataclasses.replace(params, orig_dtype=dtype))
                assert torch.equal(dense_weight(layer, dtype), expected), (options, dtype)
            product = ck.int8_linear(x, q, params.scale, None, torch.float32, convrot=params.convrot,
                                     convrot_groupsize=params.convrot_groupsize)  # fmt: skip
        with torch.no_grad():
            y = layer(x)
        if int8_weight_limit() == 127:  # the same integer product (where it is 64, torch's own saturates: 12% off)
            assert (y - product).abs().max() <= 1e-5 * product.abs().max(), options
        assert (y - x @ dense_weight(layer, torch.float32).T).abs().max() <= 0.04 * product.abs().max(), options
        y = layer(x.clone().requires_grad_())  # (a GPU's way, and training's: the stored weight dequantized)
        assert torch.allclose(y, x @ dense_weight(layer, torch.float32).T, rtol=0, atol=1e-5), options


def test_nvfp4_and_mxfp8_unpack_as_comfy_kitchen_does():
    """From bf16 / fp16 / fp32 weights, in each compute dtype: the layer keeps the file's bytes (a view) and its
    weight is comfy-kitchen's, bit for bit (its nvfp4 arithmetic rounds to the compute dtype twice: so do we);
    scales come out of cuBLAS's tiled layout whole tiles or not (rows not a multiple of 128), stored as their fp8
    type or as bytes (older files)."""
    g = torch.Generator().manual_seed(0)
    for rows, blocks in ((96, 20), (130, 7), (256, 8)):
        scales = torch.randint(0, 255, (rows, blocks), generator=g, dtype=torch.uint8)
        assert torch.equal(unblocked(to_blocked(scales, flatten=False), rows, blocks), scales)
    for fmt in ("nvfp4", "mxfp8"):
        for shape in ((96, 320), (256, 128)):
            for stored in DTYPES:
                w = (torch.randn(shape, generator=g) * 0.05).to(stored)
                sd = _packed(w, fmt, "layer")
                ours, formats = unpack_comfy({k: v for k, v in sd.items() if "comfy" not in k}, {"layer": fmt}, "t")
                layer = QuantLinear(shape[1], shape[0], False, formats["layer"])
                layer.load_state_dict({k.removeprefix("layer."): v for k, v in ours.items()}, assign=True)
                assert layer.weight.data_ptr() == sd["layer.weight"].data_ptr()  # the file's bytes
                for dtype in DTYPES:
                    assert torch.equal(dense_weight(layer, dtype), _reference(sd, "layer", fmt, dtype)), (fmt, dtype)
                as_bytes = {k: v.view(torch.uint8) if k.endswith("weight_scale") else v for k, v in sd.items()}
                again, _ = unpack_comfy({k: v for k, v in as_bytes.items() if "comfy" not in k}, formats, "t")
                assert torch.equal(again["layer.scales"], ours["layer.scales"])  # uint8 scales (older files)


def _comfy_file(klein_folder, tmp_path, formats=("nvfp4", "mxfp8"), **options):
    """The tiny klein as a BFL single file in ComfyUI's mixed form: double blocks in `formats[0]`, single blocks
    in `formats[1]` (`options`: int8's), the modulation fp8 with its marker, the rest bf16; and the same file with
    every layer unpacked as comfy-kitchen unpacks it (fp32)."""
    from test_quantize import _single_file

    path, te = _single_file(klein_folder, tmp_path)
    sd = strip_prefix(read_safetensors(path))
    packed, dense = {}, {}
    for key, w in sd.items():
        layer = key.removesuffix(".weight")
        blocks = ("double_blocks.", "single_blocks.")
        fmt = next((f for b, f in zip(blocks, formats, strict=True) if key.startswith(b)), None)
        if fmt is None or w.ndim != 2 or not key.endswith(".weight"):
            packed[key] = dense[key] = w
            continue
        packed |= _packed(w.to(torch.bfloat16), fmt, layer, **options)
        dense[key] = _reference(packed, layer, fmt, torch.float32, **options)
    mod = "double_stream_modulation_img.lin"
    scale = sd[f"{mod}.weight"].abs().max() / 448
    fp8 = (sd[f"{mod}.weight"] / scale).to(torch.float8_e4m3fn)
    packed[f"{mod}.weight"], packed[f"{mod}.weight_scale"] = fp8, scale
    packed[f"{mod}.comfy_quant"] = _marker("float8_e4m3fn")
    dense[f"{mod}.weight"] = fp8.float() * scale
    for name, tensors in (("comfy", packed), ("dense", dense)):
        (tmp_path / name).mkdir()
        save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in tensors.items()},
                  tmp_path / name / "flux-2-klein-4b-nvfp4.safetensors")  # fmt: skip
        shutil.copy(path.parent / "ae.safetensors", tmp_path / name / "ae.safetensors")
    return tmp_path / "comfy" / "flux-2-klein-4b-nvfp4.safetensors", tmp_path / "dense", te, packed


def test_a_comfyui_nvfp4_transformer_file_stays_packed_and_gives_its_weights_image(klein_folder, tmp_path):
    """BFL's / ComfyUI's nvfp4 transformer file (mixed with mxfp8, fp8 and bf16 layers) loads as it is: nvfp4 at
    0.56 byte a weight, mxfp8 at 1.03, unpacked per layer as they run; the image is bit for bit that of the same
    file unpacked up front by comfy-kitchen. The older form (the layers' formats in the header's
    `_quantization_metadata`, no markers; its names here without the tensors' prefix) reads the same. `flux2
    convert` writes them unpacked; `flux2 info` counts the weights at their shapes."""
    from flux2studio.conversion import convert, describe

    path, dense, te, packed = _comfy_file(klein_folder, tmp_path)
    pipe = load("klein-4b", weights=path, text_encoder=te, dtype="fp32")
    qkv = pipe.transformer.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, QuantLinear) and qkv.fmt == "nvfp4" and qkv.weight.shape == (192, 32)
    assert qkv.scales.shape == (192, 64 // 16 + 4)  # e4m3 a block of 16, then the tensor's fp32 scale
    assert pipe.transformer.single_blocks[0].linear1.fmt == "mxfp8"
    assert pipe.transformer.double_stream_modulation_img.lin.weight.dtype == torch.float32  # fp8 outside blocks
    image = pipe("a red circle", size=(64, 64), steps=2, seed=3)[0]
    expected = load("klein-4b", weights=dense / path.name, text_encoder=te, dtype="fp32")
    assert np.array_equal(np.asarray(image), np.asarray(expected("a red circle", size=(64, 64), steps=2, seed=3)[0]))

    layers = {k.removesuffix(".comfy_quant"): json.loads(bytes(v.tolist())) for k, v in packed.items() if "comfy" in k}
    older = tmp_path / "older" / path.name
    older.parent.mkdir()
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in packed.items() if "comfy" not in k}, older,
              metadata={"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})})  # fmt: skip
    shutil.copy(path.parent / "ae.safetensors", older.parent / "ae.safetensors")
    again = load("klein-4b", weights=older, text_encoder=te, dtype="fp32")
    assert np.array_equal(np.asarray(again("a red circle", size=(64, 64), steps=2, seed=3)[0]), np.asarray(image))

    convert(path, tmp_path / "plain.safetensors", to="bfl")  # unpacked, bf16: the weights the pipeline runs
    plain = read_safetensors(tmp_path / "plain.safetensors")
    for name, layer in pipe.transformer.named_modules():
        if isinstance(layer, QuantLinear):
            assert torch.equal(plain[name + ".weight"], dense_weight(layer, torch.bfloat16)), name
    info = describe(path)
    assert info["dtypes"]["nvfp4"] > 0 and info["dtypes"]["mxfp8"] > 0
    count = sum(p.numel() for p in klein_folder[0].transformer.parameters())
    assert info["params"] == count + 1  # (+ the fp8 layer's scale: its file's tensor)


def test_a_comfyui_int8_transformer_file_multiplies_in_int8(klein_folder, tmp_path):
    """A klein transformer file in ComfyUI's int8 (e.g. the community's flux-2-klein-9b-int8-convrot; here one
    scale a row, each group of 64 inputs rotated): its layers stay int8 rows (1 byte a weight) and multiply in int8
    on the CPU, the input rotated alike; the image at least 30 dB from its weights' (comfy-kitchen's, rotated back)
    in fp32, the floor of our own int8 (measured 42.9 dB; 39.5 capped at AVX2, where weights are halved)."""
    from flux2studio.conversion import describe
    from flux2studio.quantize import multiplies_int8
    from test_quantize import _psnr

    options = {"per_channel": True, "convrot": True, "convrot_groupsize": 64, "nested": True}  # (as ComfyUI reads too)
    path, dense, te, _ = _comfy_file(klein_folder, tmp_path, ("int8", "int8"), **options)
    pipe = load("klein-4b", weights=path, text_encoder=te, dtype="fp32")
    qkv = pipe.transformer.double_blocks[0].img_attn.qkv
    assert qkv.fmt == "comfy-int8-rot64" and qkv.weight.shape == (192, 64) and qkv.scales.shape == (192, 4)
    assert multiplies_int8(pipe.transformer)
    image = pipe("a red circle", size=(64, 64), steps=2, seed=3)[0]
    expected = load("klein-4b", weights=dense / path.name, text_encoder=te, dtype="fp32")
    psnr = _psnr(image, expected("a red circle", size=(64, 64), steps=2, seed=3)[0])
    assert psnr >= 30.0, psnr
    info = describe(path)
    assert info["dtypes"]["comfy-int8-rot64"] > 0 and info["params"] == sum(
        p.numel() for p in klein_folder[0].transformer.parameters()) + 1  # fmt: skip


def test_a_comfyui_fp4mixed_text_encoder_file_encodes_as_its_weights(klein_folder, tmp_path):
    """A Qwen3 text encoder as Comfy-Org shares klein's (`qwen_3_4b_fp4_flux2.safetensors`: nvfp4 layers beside
    bf16 ones, one file, no config; here its token table in int8 too, rotated in groups of 16): kept packed (the
    table's looked-up rows unpacked), the encoding bit for bit that of its weights as comfy-kitchen unpacks them
    in the compute dtype, bf16 and fp32."""
    from flux2studio.checkpoints import read_component, write_safetensors
    from test_quantize import _single_file

    path, te = _single_file(klein_folder, tmp_path)
    sd = read_component(te)
    packed, dense = {}, {torch.float32: {}, torch.bfloat16: {}}  # unpacked in ComfyUI's compute dtype
    for key, w in sd.items():
        layer = key.removesuffix(".weight")
        if key.startswith("model.layers.") and key.endswith(("mlp.down_proj.weight", "self_attn.o_proj.weight")):
            packed |= _packed(w.to(torch.bfloat16), "nvfp4", layer)
            for dtype, tensors in dense.items():
                tensors[key] = _reference(packed, layer, "nvfp4", dtype)
        elif key == "model.embed_tokens.weight":
            options = {"per_channel": True, "convrot": True, "convrot_groupsize": 16}
            packed |= _packed(w.to(torch.bfloat16), "int8", layer, **options)
            for dtype, tensors in dense.items():
                tensors[key] = _reference(packed, layer, "int8", dtype, **options)
        else:
            packed[key] = dense[torch.float32][key] = dense[torch.bfloat16][key] = w
    files = {"comfy": packed, "fp32": dense[torch.float32], "bf16": dense[torch.bfloat16]}
    for name, tensors in files.items():
        shutil.copytree(te / "tokenizer", tmp_path / name / "tokenizer")
        write_safetensors(tensors, tmp_path / name / "qwen_3_4b_fp4_flux2.safetensors")
    prompts = ["a red circle", "a cat holding a sign that says hello world"]
    for dtype in ("fp32", "bf16"):
        ours = load("klein-4b", weights=path, text_encoder=tmp_path / "comfy" / "qwen_3_4b_fp4_flux2.safetensors",
                    dtype=dtype).text_encoder  # fmt: skip
        assert ours.model.layers[0].mlp.down_proj.fmt == "nvfp4" and ours.model.embed_tokens.fmt == "comfy-int8-rot16"
        expected = load("klein-4b", weights=path, text_encoder=tmp_path / dtype / "qwen_3_4b_fp4_flux2.safetensors",
                        dtype=dtype).text_encoder(prompts)  # fmt: skip
        assert torch.equal(ours(prompts), expected), dtype


def test_comfyui_files_we_cannot_run_get_one_clear_error(tmp_path):
    """A ComfyUI format we do not read (SVDQuant, AWQ...), an nvfp4 layer missing its tensor scale or with
    scales not in comfy-kitchen's tiled shape, fp4 tensors without a marker (their scales' layout unknown),
    an input scale (AWQ), an nvfp4 layer in a file read whole (a VAE, a LoRA): each named."""
    from flux2studio.quantized_files import read_weights

    w = torch.randn(64, 64) * 0.05
    cases = [
        ("layer.comfy_quant", _marker("svdquant_w4a4"), r"layer layer is in ComfyUI's 'svdquant_w4a4' format"),
        ("layer.weight_scale_2", None, "nvfp4 layer layer lacks its 2-d weight, weight_scale or weight_scale_2"),
        ("layer.weight_scale", torch.zeros(64, 4, dtype=torch.float8_e4m3fn), r"comfy-kitchen writes .* \(128, 4\)"),
        ("layer.comfy_quant", None, "holds fp4 or int8 weights but its layer has no ComfyUI format marker"),
    ]
    for key, value, message in cases:
        sd = _packed(w, "nvfp4", "layer")
        sd.pop(key) if value is None else sd.update({key: value})
        save_file(sd, tmp_path / "x.safetensors")
        with pytest.raises(ValueError, match=message):
            read_weights(tmp_path / "x.safetensors")
    sd = _packed(w, "nvfp4", "layer") | {"layer.pre_quant_scale": torch.ones(64)}
    save_file(sd, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=r"scales its input \(pre_quant_scale, AWQ\): not supported"):
        read_weights(tmp_path / "x.safetensors")
    save_file(_packed(w, "nvfp4", "layer"), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="read only from a transformer or a text encoder file"):
        read_safetensors(tmp_path / "x.safetensors")
