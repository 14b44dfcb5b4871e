"""Loading real checkpoint layouts: diffusers folders (saved by diffusers itself), HF cache snapshots,
and the refusals (pickle, corrupt files, wrong keys). The CLI runs as a subprocess."""

import dataclasses
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from PIL import Image
from safetensors.torch import save_file

from flux2studio.checkpoints import build, read_safetensors
from flux2studio.loading import load
from flux2studio.model.transformer import Flux2Transformer
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

VAE4 = dataclasses.replace(VAE, channels=(32, 32, 32, 32))  # 8x down like the real VAE


def _scheduler():
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", shift=3.0)


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory):
    """A tiny klein pipeline saved by diffusers: text encoder deep enough for the real layers (9, 18, 27)."""
    pipe = Flux2KleinPipeline(
        scheduler=_scheduler(),
        vae=diffusers_vae(VAE4),
        text_encoder=qwen3(layers=28),
        tokenizer=tokenizer(QWEN3_TEMPLATE),
        transformer=diffusers_transformer(dataclasses.replace(TRANSFORMER, guidance_embed=False)),
        is_distilled=True,
    )
    folder = tmp_path_factory.mktemp("klein")
    pipe.save_pretrained(folder)
    return pipe, folder


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


def test_hf_cache_snapshot_is_found(klein_folder, tmp_path):
    _, folder = klein_folder
    entry = tmp_path / "models--black-forest-labs--FLUX.2-klein-4B"
    shutil.copytree(folder, entry / "snapshots" / "abc123")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")
    pipe = load(weights=entry, device="cpu", dtype="fp32")
    assert pipe.variant.id == "klein-4b" and pipe.variant.transformer.hidden_size == TRANSFORMER.hidden_size


def test_parts_are_loaded_per_phase_and_freed(klein_folder):
    _, folder = klein_folder
    pipe = load(weights=folder, device="cpu", dtype="fp32")
    seen = []
    pipe("a red circle", size=(64, 64), steps=1, callback=lambda *a: seen.append(dict(
        (n, c.loaded) for n, c in pipe.parts.items())))  # fmt: skip
    assert seen[0] == {"transformer": True, "vae": False, "text_encoder": False}
    assert not any(c.loaded for c in pipe.parts.values())
    resident = load(weights=folder, device="cpu", dtype="fp32", resident=True)
    resident("a red circle", size=(64, 64), steps=1)
    assert all(c.loaded for c in resident.parts.values())


def test_pickle_checkpoints_are_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"pickle checkpoint \(\.ckpt\).*safetensors"):
        read_safetensors(path)


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
