"""`flux2 convert` and `flux2 info`: exact round trips, and diffusers loads what we write (both directions)."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

from flux2studio.conversion import convert, describe
from tiny import TRANSFORMER, VAE, diffusers_transformer, diffusers_vae


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("guidance_embed", [False, True])
def test_transformer_round_trip_through_bfl_and_back(tmp_path, guidance_embed):
    model = diffusers_transformer(dataclasses.replace(TRANSFORMER, guidance_embed=guidance_embed))
    model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "flux2.safetensors", to="bfl")
    # diffusers reads our BFL file with its own single-file converter
    single = Flux2Transformer2DModel.from_single_file(
        str(tmp_path / "flux2.safetensors"), config=str(tmp_path / "src"), local_files_only=True
    )
    assert _same(single.state_dict(), model.state_dict())
    convert(tmp_path / "flux2.safetensors", tmp_path / "back", to="diffusers")
    back = Flux2Transformer2DModel.from_pretrained(tmp_path / "back")
    assert _same(back.state_dict(), model.state_dict())


def test_vae_round_trip(tmp_path):
    vae = diffusers_vae(dataclasses.replace(VAE, channels=(32, 32, 32, 32)))
    vae.save_pretrained(tmp_path / "vae")
    convert(tmp_path / "vae", tmp_path / "ae.safetensors", to="bfl")
    convert(tmp_path / "ae.safetensors", tmp_path / "vae2", to="diffusers")
    back = AutoencoderKLFlux2.from_pretrained(tmp_path / "vae2")
    assert _same(back.state_dict(), vae.state_dict())


def test_convert_never_overwrites(tmp_path):
    diffusers_transformer(TRANSFORMER).save_pretrained(tmp_path / "src")
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="nothing is overwritten"):
        convert(tmp_path / "src", tmp_path / "taken.safetensors", to="bfl")


def test_info_cli_reports_layout_params_and_sizes(tmp_path):
    model = diffusers_transformer(TRANSFORMER)
    model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "flux2.safetensors", to="bfl")
    info = describe(tmp_path / "flux2.safetensors")
    assert info["layout"] == "single file (bfl names)"
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["transformer"]["hidden_size"] == TRANSFORMER.hidden_size
    out = subprocess.run([sys.executable, "-m", "flux2studio.cli", "info", str(tmp_path / "flux2.safetensors"),
                          "--json"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert json.loads(out)["params"] == info["params"]
    component = describe(tmp_path / "src")  # diffusers' transformer/ folder (before: "folder" and nothing else)
    assert component["component"] == "Flux2Transformer2DModel" and component["transformer"] == info["transformer"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no \.safetensors file"):  # (before: "parameters: 0", exit 0)
        describe(tmp_path / "empty")
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(ValueError, match=r"notes\.gguf is not a GGUF file"):  # (before: "not ... safetensors")
        describe(tmp_path / "notes.gguf")


def test_conversions_make_one_tensor_at_a_time_and_write_what_safetensors_writes(tmp_path, monkeypatch):
    """`flux2 convert` holds about one tensor it makes at a time (fused, widened, unpacked or packed as it is
    written, never the whole model: a 64 GB dev converts on a 24 GB machine): the tensors made and alive at once are
    counted on the tiny model for each kind of conversion, from a diffusers folder, an fp8 file, a GGUF. Our
    streaming writer gives the tensors and metadata safetensors' own `save_file` gives; a tensor made in another
    shape than announced stops the write and leaves no file."""
    import weakref

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from flux2studio.checkpoints import write_safetensors
    from flux2studio.lazy_tensors import Pending, pending

    alive: set[int] = set()
    most = [0]
    made = Pending.__call__

    def counted(self):
        t = made(self)
        alive.add(id(t))
        most[0] = max(most[0], len(alive))
        weakref.finalize(t, alive.discard, id(t))
        return t

    monkeypatch.setattr(Pending, "__call__", counted)
    diffusers_transformer(TRANSFORMER).save_pretrained(tmp_path / "src")
    fp8 = tmp_path / "fp8.safetensors"
    steps = [
        (tmp_path / "src", tmp_path / "bfl.safetensors", "bfl", None),  # q, k, v fused as written
        (tmp_path / "bfl.safetensors", tmp_path / "Q4_0.gguf", "gguf", "q4_0"),  # packed as written
        (tmp_path / "Q4_0.gguf", tmp_path / "unpacked.safetensors", "bfl", None),  # unpacked as written
        (fp8, tmp_path / "int8.safetensors", "bfl", "int8"),  # widened, then packed, as written
        (fp8, tmp_path / "fp8-diffusers", "diffusers", None),  # widened, then split in three, as written
    ]
    for src, dst, to, quantize in steps:
        if src == fp8 and not fp8.exists():
            bfl = load_file(tmp_path / "bfl.safetensors")
            save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in bfl.items()}, fp8)
        most[0] = 0
        convert(src, dst, to, quantize)
        assert 1 <= most[0] <= 2, (dst.name, most[0])  # (a tensor and the one it is made from)

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 5, generator=g).bfloat16(), "scale": torch.tensor(0.5),
               "fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn), "mask": torch.tensor([True, False]),
               "rows": torch.arange(12, dtype=torch.uint8).reshape(2, 6)}  # fmt: skip
    lazy = dict(tensors) | {"w": pending(torch.clone, tensors["w"], shape=(3, 5), dtype=torch.bfloat16)}
    write_safetensors(lazy, tmp_path / "ours.safetensors", metadata={"format": "pt", "x": "1"})
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt", "x": "1"})
    ours, theirs = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "theirs.safetensors")
    as_bytes = lambda t: t.reshape(-1).view(torch.uint8)  # noqa: E731  (fp8 and bool compared as their bytes)
    assert set(ours) == set(theirs) and all(torch.equal(as_bytes(ours[k]), as_bytes(theirs[k])) for k in ours)
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "x": "1"}
    wrong = {"w": pending(torch.zeros, 4, 5, shape=(3, 5), dtype=torch.float32)}
    with pytest.raises(RuntimeError, match=r"made a \(4, 5\) torch.float32 tensor where \(3, 5\)"):
        write_safetensors(wrong, tmp_path / "wrong.safetensors")
    assert not list(tmp_path.glob("wrong*"))
    with pytest.raises(TypeError, match="metadata maps strings to strings"):  # (safetensors could not read it)
        write_safetensors(tensors, tmp_path / "wrong.safetensors", metadata={"steps": 2})
    assert not list(tmp_path.glob("wrong*"))


def test_nano_runs_the_quantized_and_gguf_files_convert_writes(tmp_path):
    """The files `flux2 convert --quantize` writes from the embedded model load with `--model nano --weights`
    (before: the nano branch read safetensors only: a shape error for int8 rows, "not a safetensors file" for
    GGUF), staying packed, and make the image within quantization's error (tolerance: max 48, mean 1.0 of 255;
    measured 23 / 0.17 for int8, 17 / 0.13 for Q8_0)."""
    import numpy as np

    from flux2studio.checkpoints import EMBEDDED
    from flux2studio.loading import load
    from flux2studio.quantize import QuantLinear

    reference = np.asarray(load("nano")("a red circle", steps=2)[0], dtype=np.int16)
    plain = load("nano", weights=EMBEDDED / "nano.safetensors")("a red circle", steps=2)[0]  # the same file, read
    assert np.array_equal(np.asarray(plain, dtype=np.int16), reference)  # as any transformer file: same image
    for name, to, mode in (("q8.safetensors", "bfl", "int8"), ("q8.gguf", "gguf", "q8_0")):
        convert(EMBEDDED / "nano.safetensors", tmp_path / name, to=to, quantize=mode)
        pipe = load("nano", weights=tmp_path / name)
        packed = [m for m in pipe.parts["transformer"].get().modules() if isinstance(m, QuantLinear)]
        assert len(packed) == 27, name
        diff = np.abs(np.asarray(pipe("a red circle", steps=2)[0], dtype=np.int16) - reference)
        assert diff.max() <= 48 and diff.mean() <= 1.0, (name, diff.max(), diff.mean())
    assert load(weights=tmp_path / "q8.gguf").variant.id == "nano"  # detected from its shape (was an error)


def test_nanos_vae_converts_to_a_diffusers_folder_that_decodes_as_ours(tmp_path):
    """GroupNorm's groups are not in the weights: nano's (4) come from its registered config (was: an error that
    32 does not divide its widths)."""
    from flux2studio.loading import EMBEDDED, load_vae, read_vae
    from flux2studio.variants import NANO_VAE

    convert(EMBEDDED / "nano-vae.safetensors", tmp_path / "vae", to="diffusers")
    theirs = AutoencoderKLFlux2.from_pretrained(tmp_path / "vae")
    ours = load_vae(read_vae(EMBEDDED / "nano-vae.safetensors"), NANO_VAE, "cpu", torch.float32)
    z = torch.randn(1, NANO_VAE.z_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours.decode_raw(z), theirs.decode(z).sample, atol=1e-5)  # fp32: same arithmetic


def test_info_on_a_folder_of_model_files_describes_one_or_names_them(tmp_path):
    from flux2studio.loading import EMBEDDED

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "nano.safetensors").write_bytes((EMBEDDED / "nano.safetensors").read_bytes())
    assert describe(tmp_path / "one")["models"] == ["nano", "nano-base"]  # (was "folder", nothing more)
    shards = tmp_path / "shards"  # one model in parts, without a config: added up, as before
    shards.mkdir()
    for i in (1, 2):
        (shards / f"model-0000{i}-of-00002.safetensors").write_bytes((EMBEDDED / "nano.safetensors").read_bytes())
    assert describe(shards)["files"].keys() == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    (tmp_path / "one" / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"holds 2 model files, not one model .*nano\.safetensors, other\.gguf"):
        describe(tmp_path / "one")  # (their sizes and parameters were added up as one model's)
