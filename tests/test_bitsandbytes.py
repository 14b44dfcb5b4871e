"""bitsandbytes 4-bit folders (NF4 / FP4, as diffusers and transformers save them, e.g. FLUX.2-dev-bnb-4bit):
read with their bytes kept packed, unpacked as bitsandbytes unpacks them, the pipeline's image that of diffusers
running the same folder. bitsandbytes (its CPU backend) writes the folders and is the reference."""

import dataclasses
import json

import bitsandbytes as bnb  # (first imported offline: conftest.py)
import numpy as np
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # its plain unpacking

from flux2studio import load
from flux2studio.quantize import QuantLinear, dense_weight
from flux2studio.quantized_files import read_component_weights, unpack_bnb
from tiny import (
    MISTRAL_TEMPLATE,
    QWEN3_TEMPLATE,
    TRANSFORMER,
    VAE,
    diffusers_transformer,
    diffusers_vae,
    mistral3,
    qwen3,
    tokenizer,
)


def _packed(w: torch.Tensor, quant_type: str, nested: bool) -> dict[str, torch.Tensor]:
    return _serialised(*bnb.functional.quantize_4bit(w, quant_type=quant_type, compress_statistics=nested))


def _serialised(q: torch.Tensor, state, prefix: str = "layer") -> dict[str, torch.Tensor]:
    """A weight as bitsandbytes serialises a `Linear4bit` (`QuantState.as_dict(packed=True)`)."""
    return {f"{prefix}.weight": q, **{f"{prefix}.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


def test_4bit_weights_unpack_as_bitsandbytes_does():
    """NF4 and FP4, with and without double-quantized absmax, from bf16 / fp16 / fp32 weights: a layer whose rows
    are whole blocks of 64 keeps the file's bytes (a view, not a copy) and unpacks to bitsandbytes' own weight
    bit for bit; one whose blocks straddle rows is unpacked at load, equal to bitsandbytes' plain (flat-block)
    unpacking (its AVX-512 CPU kernel takes those blocks per row and gets them wrong: checked, 2.0 vs 0.6 off)."""
    g = torch.Generator().manual_seed(0)
    for quant_type in ("nf4", "fp4"):
        for nested in (False, True):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for shape in ((96, 320), (40, 96)):
                    w = (torch.randn(shape, generator=g) * 0.1).to(dtype)
                    q, state = bnb.functional.quantize_4bit(w, quant_type=quant_type, compress_statistics=nested)
                    sd = _serialised(q, state)
                    with torch.compiler.set_stance("force_eager"):  # (bitsandbytes compiles it per shape: slow)
                        flat = _dequantize_4bit_compute(q.reshape(-1), _absmax(state), state.code, 64, shape, dtype)
                    ours, formats = unpack_bnb(sd, "test")
                    where = f"{quant_type} nested={nested} {dtype} {shape}"
                    if shape[1] % 64:
                        assert formats == {} and torch.equal(ours["layer.weight"], flat), where
                        continue
                    layer = QuantLinear(shape[1], shape[0], False, formats["layer"])
                    layer.load_state_dict({k.removeprefix("layer."): v for k, v in ours.items()}, assign=True)
                    assert layer.weight.data_ptr() == sd["layer.weight"].data_ptr(), where  # the file's bytes
                    assert torch.equal(dense_weight(layer, dtype), bnb.functional.dequantize_4bit(q, state)), where
                    assert torch.equal(dense_weight(layer, dtype), flat), where


def _absmax(state) -> torch.Tensor:
    if not state.nested:
        return state.absmax
    return bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset


def test_bad_bitsandbytes_files_get_one_clear_error():
    """8-bit (LLM.int8) weights, a blocksize other than 64, a quant_map that is not the code, a dtype we do not
    round to: each named, with what is supported."""
    w = torch.randn(64, 128) * 0.1
    sd = _packed(w, "nf4", False)
    cases = {
        "blocksize 128 is not supported; 64 is": lambda d: _state(d, blocksize=128),
        "its quant_map is not bitsandbytes' nf4 code": lambda d: d.update({"layer.weight.quant_map": torch.ones(16)}),
        "weights of dtype 'int8'": lambda d: _state(d, dtype="int8"),
        "quant type 'af4' is not supported; nf4 and fp4 are": lambda d: _state(d, quant_type="af4"),
    }  # fmt: skip
    for message, spoil in cases.items():
        bad = dict(sd)
        spoil(bad)
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            unpack_bnb(bad, "x.safetensors")
    int8 = {"layer.weight": torch.zeros(4, 64, dtype=torch.int8), "layer.SCB": torch.ones(4)}
    with pytest.raises(ValueError, match=r"x.safetensors: bitsandbytes 8-bit \(LLM.int8\) weights are not supported"):
        unpack_bnb(int8, "x.safetensors")


def _state(sd: dict[str, torch.Tensor], **changes) -> None:
    key = "layer.weight.quant_state.bitsandbytes__nf4"
    state = {**json.loads(bytes(sd[key].tolist())), **changes}
    sd[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


@pytest.fixture(scope="module")
def bnb_klein(tmp_path_factory):
    """A tiny klein folder whose transformer diffusers saved in NF4 with double-quantized absmax and whose Qwen3
    text encoder transformers saved in FP4, and diffusers' pipeline on it (`_bnb_folder`)."""
    from diffusers import Flux2KleinPipeline

    cfg = dataclasses.replace(TRANSFORMER, context_dim=192, guidance_embed=False)  # every layer's inputs: 64k
    parts = {"text_encoder": qwen3(layers=28, hidden=64, head_dim=16), "tokenizer": tokenizer(QWEN3_TEMPLATE)}
    folder = tmp_path_factory.mktemp("bnb-klein")
    return folder, _bnb_folder(folder, Flux2KleinPipeline, cfg, parts, ("nf4", True), ("fp4", False))


def _bnb_folder(folder, pipeline, cfg, parts: dict, transformer_4bit, text_4bit, reference: bool = True):
    """A tiny pipeline saved in `folder` from bf16 weights, its transformer then saved by diffusers and its text
    encoder by transformers in bitsandbytes 4-bit ((quant type, double-quantized absmax) each), and (`reference`)
    diffusers' pipeline loaded from it (each 4-bit layer as bitsandbytes unpacks it, in fp32: `_unpacked`).
    diffusers' quantizer asks for a GPU before quantizing; on the CPU, bitsandbytes quantizes the same: the check
    is skipped."""
    from diffusers import BitsAndBytesConfig, FlowMatchEulerDiscreteScheduler
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer
    from transformers import BitsAndBytesConfig as TransformersBnb

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", shift=3.0)
    vae = diffusers_vae(dataclasses.replace(VAE, channels=(32, 32, 32, 32)))
    transformer = diffusers_transformer(cfg).to(torch.bfloat16)
    extra = {"is_distilled": True} if "Klein" in pipeline.__name__ else {}
    parts["text_encoder"] = parts["text_encoder"].to(torch.bfloat16)
    pipeline(scheduler=scheduler, vae=vae, transformer=transformer, **parts, **extra).save_pretrained(folder)
    classes = {"transformer": type(transformer), "text_encoder": type(parts["text_encoder"])}
    configs = {"transformer": (BitsAndBytesConfig, *transformer_4bit), "text_encoder": (TransformersBnb, *text_4bit)}
    loaded = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BnB4BitDiffusersQuantizer, "validate_environment", lambda *a, **k: None)
        for name, cls in classes.items():
            config_cls, quant_type, nested = configs[name]
            config = config_cls(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=nested,
                                bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
            quantized = dict(quantization_config=config, dtype=torch.bfloat16, device_map="cpu")
            cls.from_pretrained(folder / name, **quantized).save_pretrained(folder / name)
            if reference:
                loaded[name] = cls.from_pretrained(folder / name, device_map="cpu", dtype=torch.float32)
        if not reference:
            return None
        ref = pipeline.from_pretrained(folder, torch_dtype=torch.float32, **loaded)
    for part in loaded.values():
        torch.nn.Module.float(_unpacked(part))  # (transformers keeps a 4-bit model's other layers in bf16)
    return ref


def _unpacked(model: torch.nn.Module) -> torch.nn.Module:
    """Each `Linear4bit` of a model -> an fp32 `nn.Linear` of the weight bitsandbytes unpacks (on a CPU with
    AVX512-BF16 its own 4-bit product computes in bf16, 0.02 off on a tiny layer: not the weights' arithmetic)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, bnb.nn.Linear4bit):
            plain = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            plain.weight.data = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
            if m.bias is not None:
                plain.bias.data = m.bias.data.float()
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).register_module(child, plain)
    return model


def test_a_bitsandbytes_4bit_folder_stays_packed_and_matches_diffusers(bnb_klein):
    """The transformer's and the text encoder's 4-bit layers keep the file's bytes (0.5 byte a weight, plus a
    float per 64), unpacked per layer as they run; the image is diffusers' on the same folder, each layer the
    weight bitsandbytes unpacks from it, to 1/255 per pixel (both in fp32)."""
    folder, reference = bnb_klein
    _, formats = read_component_weights(folder / "transformer")
    assert set(formats.values()) == {"bnb-nf4-bf16"} and "transformer_blocks.0.attn.to_q" in formats
    with torch.no_grad():
        expected = reference(prompt="a red circle", width=64, height=64, num_inference_steps=2,
                             generator=torch.Generator("cpu").manual_seed(7)).images[0]  # fmt: skip
    pipe = load(weights=folder, dtype="fp32", device="cpu", resident=True)
    image = pipe("a red circle", size=(64, 64), steps=2, seed=7)[0]
    qkv = pipe.transformer.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, QuantLinear) and qkv.fmt == "bnb-nf4-bf16" and qkv.weight.dtype == torch.uint8
    assert qkv.weight.shape == (3 * 64, 32)  # q, k and v fused as packed rows
    layer = pipe.text_encoder.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.fmt == "bnb-fp4-bf16"
    diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert diff.max() <= 1, diff.max()
    assert json.loads(image.info["flux2"])["model"] == "klein-4b"


def test_dev_as_diffusers_publishes_it_in_4_bit_matches_diffusers(tmp_path):
    """dev's folder in 4-bit, as diffusers/FLUX.2-dev-bnb-4bit is (its transformer here FP4, its Mistral3 text
    encoder NF4 with double-quantized absmax): the image is diffusers' on it to 1/255 per pixel, layers packed."""
    from diffusers import Flux2Pipeline

    cfg = dataclasses.replace(TRANSFORMER, context_dim=192, guidance_embed=True)
    parts = {"text_encoder": mistral3(layers=31, hidden=64, head_dim=16), "tokenizer": tokenizer(MISTRAL_TEMPLATE)}
    reference = _bnb_folder(tmp_path, Flux2Pipeline, cfg, parts, ("fp4", False), ("nf4", True))
    with torch.no_grad():
        expected = reference(prompt="a cat", width=64, height=80, num_inference_steps=2, guidance_scale=3.0,
                             generator=torch.Generator("cpu").manual_seed(1)).images[0]  # fmt: skip
    pipe = load(weights=tmp_path, dtype="fp32", device="cpu", resident=True)
    image = pipe("a cat", size=(64, 80), steps=2, guidance=3.0, seed=1)[0]
    assert pipe.variant.id == "dev" and pipe.transformer.double_blocks[0].img_mlp[0].fmt == "bnb-fp4-bf16"
    assert pipe.text_encoder.model.layers[0].self_attn.q_proj.fmt == "bnb-nf4-bf16"
    assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(expected, dtype=np.int16)).max() <= 1


def test_a_bitsandbytes_folder_is_described_and_converts_to_plain_weights(bnb_klein, tmp_path):
    """`flux2 info` counts its 4-bit weights at their shapes (the parameter count of the plain model); `flux2
    convert` writes the transformer unpacked (bf16, BFL names): the weights the pipeline runs, bit for bit. A 4-bit
    text encoder is not re-packed: a clear error."""
    from flux2studio.checkpoints import read_safetensors
    from flux2studio.conversion import convert, describe

    folder, reference = bnb_klein
    info = describe(folder)
    assert info["dtypes"]["bnb-nf4"] > 0 and info["dtypes"]["bnb-fp4"] > 0 and "U8" not in info["dtypes"]
    plain = sum(p.numel() for p in [*reference.transformer.parameters(), *reference.text_encoder.parameters()])
    assert info["params"] >= plain  # (+ the VAE's)
    out = tmp_path / "klein-bf16.safetensors"
    convert(folder / "transformer", out, to="bfl")
    sd = read_safetensors(out)
    pipe = load(weights=folder, dtype="bf16", device="cpu", resident=True)
    for name, layer in pipe.transformer.named_modules():
        if isinstance(layer, QuantLinear):
            assert torch.equal(sd[name + ".weight"], dense_weight(layer, torch.bfloat16)), name
    with pytest.raises(ValueError, match="holds bitsandbytes 4-bit weights: it loads as it is"):
        convert(folder / "text_encoder", tmp_path / "te", to="bfl", quantize="int8")


def test_dev_4_bit_is_pulled_and_found_by_its_id(tmp_path, cli, monkeypatch):
    """`flux2 pull dev --4bit` downloads dev's 4-bit copy (diffusers/FLUX.2-dev-bnb-4bit; here a local Hub mirror
    serving a tiny one) into the Hugging Face cache; `flux2 models` then shows dev present and `--model dev` runs
    it, dev's own folder being absent. A model with no 4-bit copy published says so."""
    import os
    import subprocess
    import sys

    import huggingface_hub.constants
    from diffusers import Flux2Pipeline
    from PIL import Image

    from hub_mirror import HubMirror

    cfg = dataclasses.replace(TRANSFORMER, context_dim=192, guidance_embed=True)
    parts = {"text_encoder": mistral3(layers=31, hidden=64, head_dim=16), "tokenizer": tokenizer(MISTRAL_TEMPLATE)}
    _bnb_folder(tmp_path / "src", Flux2Pipeline, cfg, parts, ("nf4", False), ("nf4", False), reference=False)
    hub = HubMirror({"diffusers/FLUX.2-dev-bnb-4bit": tmp_path / "src"})
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
    try:  # the download in its own process (huggingface_hub reads the endpoint as it is imported)
        pull = [sys.executable, "-m", "flux2studio.cli", "pull", "dev", "--4bit"]
        assert subprocess.run(pull, capture_output=True, text=True, env=env).returncode == 0
    finally:
        hub.close()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # then here, offline
    rows = {r["id"]: r for r in json.loads(cli("models", "--json").stdout)}
    assert rows["dev"]["present"] and rows["dev"]["repo_4bit"] == "diffusers/FLUX.2-dev-bnb-4bit"
    out = tmp_path / "cat.png"
    run = cli("generate", "a cat", "--model", "dev", "--size", "64x80", "--steps", "1", "-o", out)
    assert run.returncode == 0, run.stderr
    assert json.loads(Image.open(out).info["flux2"])["model"] == "dev"
    run = cli("pull", "klein-4b", "--4bit")
    assert run.returncode == 2 and "klein-4b has no 4-bit copy published (--4bit: dev)" in run.stderr
