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
from comfy_kitchen.tensor import TensorCoreMXFP8Layout, TensorCoreNVFP4Layout
from safetensors.torch import save_file

from flux2studio import load
from flux2studio.checkpoints import read_safetensors, strip_prefix
from flux2studio.quantize import QuantLinear, dense_weight
from flux2studio.quantized_files import unblocked, unpack_comfy

LAYOUTS = {"nvfp4": TensorCoreNVFP4Layout, "mxfp8": TensorCoreMXFP8Layout}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _packed(w: torch.Tensor, fmt: str, prefix: str) -> dict[str, torch.Tensor]:
    """A weight as ComfyUI saves a quantized layer: comfy-kitchen's tensors under `weight`, `weight_scale`...,
    and the layer's `comfy_quant` marker."""
    with ck.registry.use_backend("eager"):
        layout = LAYOUTS[fmt]
        parts = layout.state_dict_tensors(*layout.quantize(w))
    return {f"{prefix}.weight{k}": v for k, v in parts.items()} | {f"{prefix}.comfy_quant": _marker(fmt)}


def _marker(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def _reference(sd: dict[str, torch.Tensor], layer: str, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """The weight comfy-kitchen unpacks from a layer's tensors, in `dtype` (ComfyUI's compute dtype)."""
    with ck.registry.use_backend("eager"):
        if fmt == "nvfp4":
            return ck.dequantize_nvfp4(sd[f"{layer}.weight"], sd[f"{layer}.weight_scale_2"],
                                       sd[f"{layer}.weight_scale"], dtype)  # fmt: skip
        return ck.dequantize_mxfp8(sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"], dtype)


def test_nvfp4_and_mxfp8_unpack_as_comfy_kitchen_does():
    """From bf16 / fp16 / fp32 weights, in each compute dtype: the layer keeps the file's bytes (a view) and its
    weight is comfy-kitchen's, bit for bit (its nvfp4 arithmetic rounds to the compute dtype twice: so do we);
    scales come out of cuBLAS's tiled layout whole tiles or not (rows not a multiple of 128)."""
    g = torch.Generator().manual_seed(0)
    for rows, blocks in ((96, 20), (130, 7), (256, 8)):
        scales = torch.randint(0, 255, (rows, blocks), generator=g, dtype=torch.uint8)
        assert torch.equal(unblocked(to_blocked(scales, flatten=False), rows, blocks), scales)
    for fmt in LAYOUTS:
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


def _comfy_file(klein_folder, tmp_path):
    """The tiny klein as a BFL single file in ComfyUI's mixed form: double blocks nvfp4, single blocks mxfp8,
    the modulation fp8 with its marker, the rest bf16; and the same file with every layer unpacked as
    comfy-kitchen unpacks it (fp32)."""
    from test_quantize import _single_file

    path, te = _single_file(klein_folder, tmp_path)
    sd = strip_prefix(read_safetensors(path))
    packed, dense = {}, {}
    for key, w in sd.items():
        layer = key.removesuffix(".weight")
        fmt = "nvfp4" if key.startswith("double_blocks.") else "mxfp8" if key.startswith("single_blocks.") else None
        if fmt is None or w.ndim != 2 or not key.endswith(".weight"):
            packed[key] = dense[key] = w
            continue
        packed |= _packed(w.to(torch.bfloat16), fmt, layer)
        dense[key] = _reference(packed, layer, fmt, torch.float32)
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
    `_quantization_metadata`, no markers) reads the same. `flux2 convert` writes them unpacked; `flux2 info` counts
    the weights at their shapes."""
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
              metadata={"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {
                  f"model.diffusion_model.{k}": v for k, v in layers.items()}})})  # fmt: skip
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


def test_a_comfyui_fp4mixed_text_encoder_file_encodes_as_its_weights(klein_folder, tmp_path):
    """A Qwen3 text encoder as Comfy-Org shares klein's (`qwen_3_4b_fp4_flux2.safetensors`: nvfp4 layers beside
    bf16 ones, one file, no config): kept packed, the encoding bit for bit that of its weights as comfy-kitchen
    unpacks them in the compute dtype, bf16 and fp32."""
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
        assert ours.model.layers[0].mlp.down_proj.fmt == "nvfp4"
        expected = load("klein-4b", weights=path, text_encoder=tmp_path / dtype / "qwen_3_4b_fp4_flux2.safetensors",
                        dtype=dtype).text_encoder(prompts)  # fmt: skip
        assert torch.equal(ours(prompts), expected), dtype


def test_comfyui_files_we_cannot_run_get_one_clear_error(tmp_path):
    """A ComfyUI format we do not read (int8, svdquant...), an nvfp4 layer missing its tensor scale or with
    scales not in comfy-kitchen's tiled shape, nvfp4-like tensors without a marker (their scales' layout unknown),
    an nvfp4 layer in a file read whole (a VAE, a LoRA): each named."""
    from flux2studio.quantized_files import read_weights

    w = torch.randn(64, 64) * 0.05
    cases = [
        ("layer.comfy_quant", _marker("int8_tensorwise"), r"layer layer is in ComfyUI's 'int8_tensorwise' format"),
        ("layer.weight_scale_2", None, "nvfp4 layer layer lacks its 2-d weight, weight_scale or weight_scale_2"),
        ("layer.weight_scale", torch.zeros(64, 4, dtype=torch.float8_e4m3fn), r"comfy-kitchen writes .* \(128, 4\)"),
        ("layer.comfy_quant", None, "holds fp4 weights with two scales but no ComfyUI format marker"),
    ]
    for key, value, message in cases:
        sd = _packed(w, "nvfp4", "layer")
        sd.pop(key) if value is None else sd.update({key: value})
        save_file(sd, tmp_path / "x.safetensors")
        with pytest.raises(ValueError, match=message):
            read_weights(tmp_path / "x.safetensors")
    save_file(_packed(w, "nvfp4", "layer"), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="only a transformer or a text encoder file may use"):
        read_safetensors(tmp_path / "x.safetensors")
