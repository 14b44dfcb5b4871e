"""Loading real checkpoint layouts: diffusers folders (saved by diffusers itself), HF cache snapshots,
and the refusals (pickle, corrupt files, wrong keys). The CLI runs as a subprocess."""

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
from PIL import Image
from safetensors.torch import save_file

from flux2studio.checkpoints import build, read_safetensors
from flux2studio.conversion import convert
from flux2studio.loading import load
from flux2studio.model.autoencoder import AutoEncoder
from flux2studio.model.transformer import Flux2Transformer
from tiny import (
    MISTRAL_TEMPLATE,
    TRANSFORMER,
    VAE,
    diffusers_transformer,
    diffusers_vae,
    mistral3,
    qwen3,
    tokenizer,
)

VAE4 = dataclasses.replace(VAE, channels=(32, 32, 32, 32))  # 8x down like the real VAE


def _scheduler():
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", shift=3.0)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flux2studio.cli", *args], capture_output=True, text=True)


def _max_pixel_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def test_cli_generate_from_diffusers_klein_folder_matches_diffusers(klein_folder, tmp_path):
    pipe, folder = klein_folder
    with torch.no_grad():
        expected = pipe(prompt="a red circle", width=96, height=64, num_inference_steps=2,
                        generator=torch.Generator("cpu").manual_seed(7)).images[0]  # fmt: skip
    out = tmp_path / "out.png"
    run = _cli("generate", "a red circle", "--weights", str(folder), "--size", "96x64", "--seed", "7",
               "--steps", "2", "--dtype", "fp32", "--device", "cpu", "-o", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr
    # PNG from PNG: at most 1/255 per pixel (rounding of values within 1e-4 of a .5 boundary).
    assert _max_pixel_diff(Image.open(out), expected) <= 1


def test_dev_folder_with_embedded_guidance_matches_diffusers(tmp_path):
    pipe = Flux2Pipeline(
        scheduler=_scheduler(),
        vae=diffusers_vae(VAE4),
        text_encoder=mistral3(layers=31),  # layer 30 must not be the last (normed) one
        tokenizer=tokenizer(MISTRAL_TEMPLATE),
        transformer=diffusers_transformer(dataclasses.replace(TRANSFORMER, guidance_embed=True)),
    )
    pipe.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = pipe(prompt="a cat", width=64, height=80, num_inference_steps=2, guidance_scale=3.0,
                        generator=torch.Generator("cpu").manual_seed(1)).images[0]  # fmt: skip
    ours = load(weights=tmp_path, device="cpu", dtype="fp32")
    assert ours.variant.id == "dev"
    got = ours("a cat", size=(64, 80), steps=2, guidance=3.0, seed=1)[0]
    assert _max_pixel_diff(got, expected) <= 1


def test_dev_text_encoder_as_a_gguf_as_llama_cpp_writes_mistral(tmp_path, monkeypatch):
    """dev's Mistral text encoder as one GGUF file (`flux2 convert TE x.gguf --to gguf`; the files people share,
    e.g. Mistral-Small-3.2 Q4_K_M for stable-diffusion.cpp's `--llm`): architecture "llama", llama.cpp's names,
    query and key rows permuted as llama.cpp's converter does. transformers' GGUF reader (its own undoing of the
    permutation) reads back the folder's weights. Loaded with `--text-encoder x.gguf` beside a dev single file,
    its tokenizer from a `tokenizer/` folder beside it or the Hugging Face cache (none: an error naming the
    download): BF16 encodes bit for bit as the folder in bf16; Q8_0 stays packed (the query and key rows too, as
    stored: their outputs are taken in transformers' order), its query and key projections those of transformers'
    reading of the file, and it encodes close to the folder; packed at load (int8), the BF16 file encodes as the
    folder does. A text encoder of the other kind,
    or of another width than the transformer takes: one clear error each, before loading."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from flux2studio.conversion import describe
    from flux2studio.layouts.transformer import transformer_from_diffusers
    from flux2studio.layouts.vae import vae_from_diffusers
    from flux2studio.quantize import QuantLinear

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    transformer = diffusers_transformer(dataclasses.replace(TRANSFORMER, guidance_embed=True))
    save_file({k: v.contiguous() for k, v in transformer_from_diffusers(transformer.state_dict()).items()},
              str(tmp_path / "flux2-dev.safetensors"))  # fmt: skip
    save_file({k: v.contiguous() for k, v in vae_from_diffusers(diffusers_vae(VAE4).state_dict(), VAE4).items()},
              str(tmp_path / "ae.safetensors"))  # fmt: skip
    encoder = mistral3(layers=31)
    encoder.save_pretrained(tmp_path / "text_encoder")
    tokenizer(MISTRAL_TEMPLATE).save_pretrained(tmp_path / "tokenizer")
    files = {fmt: tmp_path / "gguf" / f"mistral-{fmt}.gguf" for fmt in ("bf16", "q8_0")}
    for fmt, file in files.items():
        convert(tmp_path / "text_encoder", file, "gguf", fmt)

    folder = {k.removeprefix("model.language_model."): v for k, v in encoder.state_dict().items()}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2}
    theirs = {}  # name -> (weight as transformers reads it back, its GGUF type)
    for fmt, file in files.items():
        reader = gguf.GGUFReader(str(file))
        assert reader.get_field("general.architecture").contents() == "llama"
        for t in reader.tensors:
            if t.name.startswith("blk.") and t.name.endswith(("attn_q.weight", "attn_k.weight")):
                w = LlamaTensorProcessor(heads).process(gguf.dequantize(t.data, t.tensor_type), t.name).weights
                theirs[fmt, t.name] = torch.from_numpy(w.copy())
    k = folder["layers.3.self_attn.k_proj.weight"]
    assert torch.equal(theirs["bf16", "blk.3.attn_k.weight"], k.bfloat16().float())
    q, ref_q = theirs["q8_0", "blk.3.attn_q.weight"], folder["layers.3.self_attn.q_proj.weight"]
    assert (q - ref_q).abs().max() <= ref_q.abs().max() / 127  # Q8_0 of the same rows, in the same order

    prompts = ["a red circle", "a cat holding a sign that says hello world, photo, 35mm"]
    dev = tmp_path / "flux2-dev.safetensors"
    with pytest.raises(FileNotFoundError, match=r"download black-forest-labs/FLUX.2-dev --include"):
        load("dev", weights=dev, text_encoder=files["bf16"])
    shutil.copytree(tmp_path / "tokenizer", tmp_path / "gguf" / "tokenizer")
    ref = load("dev", weights=dev, text_encoder=tmp_path / "text_encoder", dtype="bf16").text_encoder(prompts)
    assert torch.equal(load("dev", weights=dev, text_encoder=files["bf16"], dtype="bf16").text_encoder(prompts), ref)
    packed = load("dev", weights=dev, text_encoder=files["q8_0"], dtype="fp32").text_encoder
    attention = packed.model.layers[3].self_attn
    assert isinstance(attention.q_proj, QuantLinear) and attention.q_proj.fmt == "Q8_0"
    x = torch.randn(5, 32)  # the projections as transformers' reading of the file computes them
    torch.testing.assert_close(attention.q_proj(x), x @ q.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention.k_proj(x), x @ theirs["q8_0", "blk.3.attn_k.weight"].T, rtol=1e-5, atol=1e-6)
    full = load("dev", weights=dev, text_encoder=tmp_path / "text_encoder", dtype="fp32").text_encoder(prompts)
    error = ((packed(prompts) - full).norm() / full.norm()).item()
    assert error < 0.05, error
    int8 = [load("dev", weights=dev, text_encoder=te, dtype="bf16", quantize="int8").text_encoder(prompts)
            for te in (tmp_path / "text_encoder", files["bf16"])]  # fmt: skip
    assert torch.equal(*int8)  # the BF16 file packed at load: its rows packed as stored, outputs put back in order
    qwen3().save_pretrained(tmp_path / "qwen3")
    with pytest.raises(ValueError, match="qwen3 is a qwen3 text encoder; this model takes a mistral3 one"):
        load("dev", weights=dev, text_encoder=tmp_path / "qwen3")
    mistral3(layers=31, hidden=16).save_pretrained(tmp_path / "narrow")
    with pytest.raises(ValueError, match=r"narrow gives text features of width 48; .* takes 96"):
        load("dev", weights=dev, text_encoder=tmp_path / "narrow")
    info = describe(files["q8_0"])
    assert info["component"] == "text encoder" and info["text_encoder"]["kind"] == "mistral3"
    assert info["text_encoder"]["config"]["head_dim"] == 8 and info["text_encoder"]["config"]["num_hidden_layers"] == 31


def test_hf_cache_snapshot_is_found(klein_folder, tmp_path):
    _, folder = klein_folder
    entry = tmp_path / "models--black-forest-labs--FLUX.2-klein-4B"
    shutil.copytree(folder, entry / "snapshots" / "abc123")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")
    pipe = load(weights=entry, device="cpu", dtype="fp32")
    assert pipe.variant.id == "klein-4b" and pipe.variant.transformer.hidden_size == TRANSFORMER.hidden_size


def test_parts_are_loaded_per_phase_and_freed(klein_folder, monkeypatch):
    _, folder = klein_folder
    pipe = load(weights=folder, device="cpu", dtype="fp32")
    seen = []
    pipe("a red circle", size=(64, 64), steps=1, callback=lambda *a: seen.append(dict(
        (n, c.loaded) for n, c in pipe.parts.items())))  # fmt: skip
    assert seen[0] == {"transformer": True, "vae": False, "text_encoder": False}
    assert not any(c.loaded for c in pipe.parts.values())
    encoding, encode = [], AutoEncoder.encode  # an edit: the VAE encodes the reference alone, before the transformer

    def watched(vae, x, tile=None):
        if not x.is_meta:  # not the work estimate's trace (shapes only, on the meta device)
            encoding.append({n: c.loaded for n, c in pipe.parts.items()})
        return encode(vae, x, tile)

    monkeypatch.setattr(AutoEncoder, "encode", watched)
    pipe("a red circle", size=(64, 64), steps=1, refs=[Image.new("RGB", (64, 64), "red")])
    assert encoding == [{"transformer": False, "vae": True, "text_encoder": False}]
    resident = load(weights=folder, device="cpu", dtype="fp32", resident=True)
    resident("a red circle", size=(64, 64), steps=1)
    assert all(c.loaded for c in resident.parts.values())


def test_pickle_checkpoints_are_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"pickle checkpoint \(\.ckpt\).*safetensors"):
        read_safetensors(path)
    path.rename(renamed := tmp_path / "model.safetensors")  # (was "header too large")
    with pytest.raises(ValueError, match=r"is a pickle checkpoint \(PyTorch's torch.save\) under a \.safetensors name"):
        read_safetensors(renamed)


def test_truncated_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_safetensors(path)


def test_missing_unexpected_and_misshapen_keys_are_all_named():
    sd = Flux2Transformer(TRANSFORMER).state_dict()
    sd.pop("img_in.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["txt_in.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as err:
        build(lambda: Flux2Transformer(TRANSFORMER), sd, "test")
    message = str(err.value)
    assert "1 missing: img_in.weight" in message
    assert "1 unexpected: extra.weight" in message
    assert "txt_in.weight: file (3, 3) vs model (64, 96)" in message


def _single_files(klein_folder, tmp_path, fp8: bool):
    """Official-style files from the tiny folder: BFL transformer (prefixed), ae.safetensors, text encoder."""
    from flux2studio.layouts.transformer import transformer_from_diffusers
    from flux2studio.layouts.vae import vae_from_diffusers

    pipe, folder = klein_folder
    sd = transformer_from_diffusers(pipe.transformer.state_dict())
    if fp8:  # per-tensor scaled fp8, as BFL / ComfyUI ship: weight_scale beside each fp8 weight
        scaled = {}
        for k, v in sd.items():
            if k.endswith(".weight") and v.ndim == 2:
                scale = v.abs().max() / 448
                scaled[k] = (v / scale).to(torch.float8_e4m3fn)
                scaled[k[: -len(".weight")] + ".weight_scale"] = scale.reshape(())
            else:
                scaled[k] = v
        sd = scaled
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in sd.items()},
              str(tmp_path / "flux-2-klein-4b.safetensors"))  # fmt: skip
    vae_sd = vae_from_diffusers(pipe.vae.state_dict(), VAE4)
    save_file({k: v.contiguous() for k, v in vae_sd.items()}, str(tmp_path / "ae.safetensors"))
    return tmp_path / "flux-2-klein-4b.safetensors", folder / "text_encoder", folder


def test_bfl_single_file_gives_the_same_image_as_the_folder(klein_folder, tmp_path):
    path, te, folder = _single_files(klein_folder, tmp_path, fp8=False)
    shutil.copytree(folder / "tokenizer", tmp_path / "te" / "tokenizer")
    for f in te.iterdir():
        shutil.copy(f, tmp_path / "te" / f.name)
    single = load("klein-4b", weights=path, text_encoder=tmp_path / "te", device="cpu", dtype="fp32")
    from_folder = load(weights=folder, device="cpu", dtype="fp32")
    a = single("a red circle", size=(64, 64), steps=2, seed=3)[0]
    b = from_folder("a red circle", size=(64, 64), steps=2, seed=3)[0]
    assert _max_pixel_diff(a, b) <= 1  # same weights; fused vs split qkv sums differ in the last bits


def test_fp8_single_file_is_dequantised_with_its_scales(klein_folder, tmp_path):
    from flux2studio.checkpoints import dequantize_fp8, strip_prefix

    path, _, _ = _single_files(klein_folder, tmp_path, fp8=True)
    raw = strip_prefix(read_safetensors(path))
    assert raw["img_in.weight"].dtype == torch.float8_e4m3fn and "img_in.weight_scale" in raw
    sd, _ = dequantize_fp8(raw, torch.float32)
    assert not any(k.endswith("_scale") for k in sd)
    exact = Flux2Transformer(dataclasses.replace(TRANSFORMER, guidance_embed=False)).state_dict()
    assert set(sd) == set(exact)
    original = klein_folder[0].transformer.x_embedder.weight
    # fp8 e4m3 keeps 3 mantissa bits: relative error below 2^-4 of the tensor's max.
    assert (sd["img_in.weight"] - original).abs().max() <= original.abs().max() / 16


def test_an_fp8_single_file_converts_to_the_diffusers_layout(klein_folder, tmp_path):
    """`flux2 convert` on an official fp8 file (before: it passed dequantize_fp8's pair on as the tensors)."""
    from flux2studio.conversion import convert, read_any

    path, _, _ = _single_files(klein_folder, tmp_path, fp8=True)
    convert(path, tmp_path / "out", "diffusers")
    kind, layout, sd, _ = read_any(tmp_path / "out")
    assert (kind, layout) == ("transformer", "diffusers") and not any(k.endswith("_scale") for k in sd)


def test_pages_of_converted_tensors_are_given_back(tmp_path):
    """q, k, v read from the mapped file and fused are dropped from the resident set; kept tensors and
    the dropped ones' contents are unchanged (clean file pages fault back in from the file)."""
    from safetensors.torch import save_file

    from flux2studio.checkpoints import read_safetensors
    from flux2studio.residency import drop_unused_pages

    g = torch.Generator().manual_seed(0)
    original = {"kept": torch.randn(512, 512, generator=g), "fused_away": torch.randn(1024, 1024, generator=g)}
    save_file(original, str(tmp_path / "w.safetensors"))
    sd = read_safetensors(tmp_path / "w.safetensors")
    module = torch.nn.Linear(512, 512, bias=False)
    module.load_state_dict({"weight": sd["kept"]}, assign=True)
    assert sd["fused_away"].sum().item() != 0  # touched: its pages are resident now
    dropped = drop_unused_pages(sd, module)
    assert 4 * 1024 * 1024 - 4096 <= dropped <= 4 * 1024 * 1024  # whole pages of fused_away only
    assert torch.equal(module.weight, original["kept"]) and torch.equal(sd["fused_away"], original["fused_away"])


def test_text_encoder_built_from_mapped_files_equals_from_pretrained(klein_folder, tmp_path):
    """Qwen3 is built on the meta device and given the mapped tensors of the layers the variant takes;
    its embeddings are bit-identical to transformers' from_pretrained of the whole model."""
    from transformers import AutoTokenizer, Qwen3Model

    from flux2studio.loading import hf_text_encoder
    from flux2studio.text_encoders import TextEncoder

    _, folder = klein_folder
    spec = load(weights=folder).variant.text_encoder
    ours = hf_text_encoder(spec, folder / "text_encoder", folder / "tokenizer", "cpu", torch.float32)
    full = Qwen3Model.from_pretrained(folder / "text_encoder", dtype=torch.float32)
    reference = TextEncoder(spec, full, AutoTokenizer.from_pretrained(folder / "tokenizer"))
    prompts = ["a red circle", "two blue squares on a black background"]
    assert torch.equal(ours(prompts), reference(prompts))

    broken = tmp_path / "text_encoder"
    shutil.copytree(folder / "text_encoder", broken)
    for f in broken.glob("*.safetensors"):
        tensors = {k: v for k, v in read_safetensors(f).items() if k != "model.layers.0.mlp.up_proj.weight"}
        f.unlink()
        save_file(tensors, f)
    with pytest.raises(ValueError, match=r"missing: layers\.0\.mlp\.up_proj\.weight"):
        hf_text_encoder(spec, broken, folder / "tokenizer", "cpu", torch.float32)


def test_text_encoder_stored_packed_loads_as_packed_at_load(klein_folder, tmp_path, monkeypatch):
    """`flux2 convert TEXT_ENCODER_FOLDER DST --to bfl --quantize int8` writes the decoder layers packed, shard by
    shard; the folder loads packed (memory-mapped) and encodes exactly as the plain folder packed at load."""
    from flux2studio import conversion
    from flux2studio.loading import hf_text_encoder
    from flux2studio.quantize import QuantLinear

    _, folder = klein_folder
    spec = load(weights=folder).variant.text_encoder
    monkeypatch.setattr(conversion, "SHARD_BYTES", 2**16)  # several shards, each written before the next is read
    message = conversion.convert(folder / "text_encoder", tmp_path / "te-int8", "bfl", "int8")
    assert "text encoder (qwen3)" in message and len(list((tmp_path / "te-int8").glob("model-*.safetensors"))) > 2
    stored = hf_text_encoder(spec, tmp_path / "te-int8", folder / "tokenizer", "cpu", torch.float32)
    at_load = hf_text_encoder(
        spec, folder / "text_encoder", folder / "tokenizer", "cpu", torch.float32, quantize="int8"
    )
    layer = stored.model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantLinear) and layer.weight.dtype == torch.uint8
    prompts = ["a red circle", "two blue squares on a black background"]
    assert torch.equal(stored(prompts), at_load(prompts))
    with pytest.raises(ValueError, match=r"is a text encoder: it is written packed, as a folder \(--to bfl"):
        conversion.convert(folder / "text_encoder", tmp_path / "te-plain", "bfl", None)


def test_next_part_is_read_ahead_without_being_loaded(klein_folder):
    _, folder = klein_folder
    pipe = load(weights=folder)
    for name in ("transformer", "vae"):
        part = pipe.parts[name]
        assert part.files and all(f.suffix == ".safetensors" for f in part.files)
        part.prefetch()  # a background read into the page cache; the part itself stays unloaded
        assert not part.loaded


def _mapped_kb(folder) -> int:
    """Resident kB of this process's mappings of files under `folder` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header: address range, ..., path
            inside = line.rstrip().endswith(".safetensors") and str(folder) in line
        elif inside and first == "Rss:":
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page residency is read from /proc (Linux)")
def test_streamed_blocks_leave_memory_after_running_and_give_the_same_image(klein_folder, tmp_path):
    """Not resident (the default): each block's file pages are mapped for its run and handed back after,
    so between steps only a fraction of the transformer file is resident; resident: all of it stays."""
    _, small = klein_folder
    folder = tmp_path / "klein"
    shutil.copytree(small, folder, ignore=shutil.ignore_patterns("transformer"))
    # blocks of ~1-2 MB each, so that the kernel's fault-around (64 kB) is small beside them
    wide = dataclasses.replace(TRANSFORMER, hidden_size=256, num_heads=4, axes_dim=(16, 16, 16, 16))
    diffusers_transformer(dataclasses.replace(wide, guidance_embed=False)).save_pretrained(folder / "transformer")
    files = folder / "transformer"
    size_kb = sum(f.stat().st_size for f in files.glob("*.safetensors")) // 1024
    images, during = {}, {}
    for resident in (False, True):
        pipe = load(weights=folder, dtype="fp32", resident=resident)
        during[resident] = []
        images[resident] = pipe(
            "a red circle", size=(64, 64), steps=2, callback=lambda *a, r=resident: during[r].append(_mapped_kb(files))
        )[0]
    assert np.array_equal(np.asarray(images[False]), np.asarray(images[True]))
    # resident: all but the double blocks' q, k, v (fused into new tensors on load, their pages dropped);
    # streamed: the small non-block weights and the kernel's fault-around, measured ~20% of the file
    assert min(during[True]) > 0.75 * size_kb
    assert max(during[False]) < 0.3 * size_kb


def test_weights_that_do_not_fit_are_refused_at_load_with_the_way_out(klein_folder, tmp_path):
    """Checked from the headers when loading, not at the first use of the part (a VAE that did not fit failed at
    decode, after every step): a FLUX.1-style VAE, a VAE or a transformer given as the other, a file said to be
    another registered model, a folder's distillation contradicting --model, a folder without its tokenizer. A
    VAE inside a full checkpoint (`first_stage_model.`) and ComfyUI's scaled-fp8 marker load; --text-encoder and
    --vae replace a folder's own (they were ignored)."""
    from flux2studio.checkpoints import dequantize_fp8
    from flux2studio.loading import check_model_fits
    from flux2studio.variants import get_variant

    path, te, folder = _single_files(klein_folder, tmp_path, fp8=False)
    good = read_safetensors(tmp_path / "ae.safetensors")
    kw = {"text_encoder": te, "device": "cpu", "dtype": "fp32"}
    save_file({k: v for k, v in good.items() if not k.startswith("bn.")}, str(tmp_path / "flux1-ae.safetensors"))
    with pytest.raises(ValueError, match=r"3 missing: bn\.num_batches_tracked.*\(FLUX\.1's VAE\?"):
        load("klein-4b", weights=path, vae=tmp_path / "flux1-ae.safetensors", **kw)
    with pytest.raises(ValueError, match=r"ae\.safetensors is a vae, not a transformer: give it as --vae"):
        load("klein-4b", weights=tmp_path / "ae.safetensors", **kw)
    with pytest.raises(ValueError, match=r"is a transformer, not a VAE"):
        load("klein-4b", weights=path, vae=path, **kw)
    save_file({f"first_stage_model.{k}": v for k, v in good.items()}, str(tmp_path / "full-vae.safetensors"))
    pipe = load("klein-4b", weights=path, vae=tmp_path / "full-vae.safetensors", **kw)
    assert torch.equal(pipe.vae.state_dict()["bn.running_var"], good["bn.running_var"])
    with pytest.raises(
        ValueError, match=r"has the shape of klein-9b / klein-9b-kv / klein-base-9b, not of klein-4b: pass"
    ):
        check_model_fits("f.safetensors", get_variant("klein-9b").transformer, get_variant("klein-4b"))
    with pytest.raises(
        ValueError, match=r"is distilled \(model_index.json\), not klein-base-4b: pass --model klein-4b"
    ):
        check_model_fits("folder", get_variant("klein-4b").transformer, get_variant("klein-base-4b"), True)
    marked = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn), "w": torch.ones(2).to(torch.float8_e4m3fn)}
    assert set(dequantize_fp8(marked, torch.float32)[0]) == {"w"}  # (was "1 unexpected: scaled_fp8")
    with pytest.raises(FileNotFoundError, match="nope"):  # the folder's own text encoder was used
        load(weights=folder, text_encoder=tmp_path / "nope", device="cpu")
    assert load(weights=folder, vae=tmp_path / "full-vae.safetensors", device="cpu").vae is not None
    assert load(weights=folder, text_encoder=folder, device="cpu").text_encoder is not None  # (its text_encoder/)
    with pytest.raises(ValueError, match=r"is one part of the diffusers pipeline .*: give the pipeline's folder"):
        load(weights=folder / "transformer", device="cpu")
    with pytest.raises(FileNotFoundError, match="nope"):  # nano's own VAE was used
        load("nano", vae=tmp_path / "nope.safetensors", device="cpu")
    from flux2studio.conversion import file_component

    whole = ["model.diffusion_model.double_blocks.0.x", "first_stage_model.encoder.down.0.x", "te.embed_tokens.weight"]
    assert file_component(whole) == "full checkpoint" and file_component(whole[1:2]) == "vae"
    shutil.copytree(folder, tmp_path / "no-tok", ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer/ folder, which its text encoder needs"):
        load(weights=tmp_path / "no-tok", device="cpu")


def test_fp16_weights_computing_in_bf16_stay_fp16_and_give_the_same_image(klein_folder, tmp_path):
    """An fp16 file computing in bf16 is converted per layer as it runs (it was copied whole at load: klein-4b's
    8 GB in memory where streaming holds a block), with the same rounding as a file cast to bf16 beforehand."""
    path, te, _ = _single_files(klein_folder, tmp_path, fp8=False)
    sd = read_safetensors(path)
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        (tmp_path / name).mkdir()
        cast = {k: v.half().to(dtype) if v.is_floating_point() else v for k, v in sd.items()}  # bf16: via fp16
        save_file(cast, str(tmp_path / name / path.name))
        shutil.copy(tmp_path / "ae.safetensors", tmp_path / name)
    images = []
    for name in ("fp16", "bf16"):
        pipe = load("klein-4b", weights=tmp_path / name / path.name, text_encoder=te, device="cpu", dtype="bf16")
        images.append(np.asarray(pipe("a red circle", size=(64, 64), steps=2, seed=1)[0]))
        if name == "fp16":
            assert pipe.transformer.double_blocks[0].img_attn.qkv.weight.dtype == torch.float16
    assert np.array_equal(*images)
    from flux2studio.precision import storage

    half = {"w": torch.ones(2, dtype=torch.float16)}  # resident or on an accelerator: cast once (same bytes)
    assert storage(half, torch.bfloat16)["w"].dtype == torch.float16
    assert storage(half, torch.bfloat16, streamed=False)["w"].dtype == torch.bfloat16
