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
