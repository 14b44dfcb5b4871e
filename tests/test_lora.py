"""LoRA files in every trainer's layout change our output exactly as the same LoRA does in diffusers/PEFT."""

import dataclasses
import json

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from flux2studio.layouts.transformer import transformer_from_diffusers
from flux2studio.lora import _diffusers_names, apply_loras, load_lora
from flux2studio.model.transformer import Flux2Transformer
from flux2studio.sampling import image_ids, text_ids
from tiny import TRANSFORMER, diffusers_transformer

CFG = dataclasses.replace(TRANSFORMER, guidance_embed=False)
TOL = 1e-5  # fp32, a 4-block model: summation order only; relative to the largest output (they reach ~9)
RANK, ALPHA = 4, 8
TARGETS = (  # every Linear kind of the model, as a PEFT regex (diffusers names)
    r".*(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out|linear_in|linear_out|to_qkv_mlp_proj"
    r"|single_transformer_blocks\.\d+\.attn\.to_out|x_embedder|proj_out|norm_out\.linear)$"
)


def _inputs():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(1, 12, 128, generator=g), torch.randn(1, 5, CFG.context_dim, generator=g)
    return img, image_ids(3, 4), txt, text_ids(5), torch.tensor([0.7])


def _diffusers_out(model, inputs):
    img, ii, txt, ti, t = inputs
    with torch.no_grad():
        return model(hidden_states=img, encoder_hidden_states=txt, timestep=t, img_ids=ii, txt_ids=ti,
                     return_dict=False)[0]  # fmt: skip


def _ours_out(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.fixture(scope="module")
def peft_pair():
    """A diffusers transformer with a random PEFT LoRA (shared A for q/k/v, so every layout can express it)."""
    ref = diffusers_transformer(CFG)
    base_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    ref.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for blk in ref.transformer_blocks:  # fused qkv layouts share one A across q, k, v
            for group in (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")):
                a = getattr(blk.attn, group[0]).lora_A["default"].weight
                for n in group[1:]:
                    getattr(blk.attn, n).lora_A["default"].weight.copy_(a)
    lora_sd = get_peft_model_state_dict(ref)
    expected = _diffusers_out(ref, _inputs())
    ours = Flux2Transformer(CFG).eval()
    ours.load_state_dict(transformer_from_diffusers(base_sd))
    return ours, lora_sd, expected


def _save(tmp_path, name, sd, metadata=None):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def _to_bfl(lora_sd: dict, scale: float) -> dict:
    """The PEFT LoRA in BFL names (ai-toolkit / fal style): q/k/v fused (shared A, stacked B), scale in B."""
    names = _diffusers_names(Flux2Transformer(CFG))
    grouped: dict[str, dict] = {}
    for key, value in lora_sd.items():
        module, factor = key.rsplit(".lora_", 1)
        target, part, _, swap = names[module]
        slot = grouped.setdefault(target, {"A": {}, "B": {}, "swap": swap})
        slot[factor[0]][part] = value
    out = {}
    for target, slot in grouped.items():
        up = torch.cat([slot["B"][i] for i in sorted(slot["B"])]) * scale
        if slot["swap"]:  # diffusers' (scale, shift) rows -> BFL's (shift, scale)
            a, b = up.chunk(2)
            up = torch.cat([b, a])
        out[f"diffusion_model.{target}.lora_A.weight"] = slot["A"][0]
        out[f"diffusion_model.{target}.lora_B.weight"] = up
    return out


def _run(ours, path, mode="fuse", scale=1.0):
    lora = load_lora(path, ours)
    applied = apply_loras(ours, [(lora, scale)], mode=mode)
    out = _ours_out(ours, _inputs())
    applied.remove()
    return lora, out


def test_diffusers_peft_layout_with_adapter_metadata(peft_pair, tmp_path):
    ours, lora_sd, expected = peft_pair
    meta = {"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": ALPHA})}
    path = _save(tmp_path, "peft", {f"transformer.{k}": v for k, v in lora_sd.items()}, meta)
    lora, got = _run(ours, path)
    assert lora.format == "diffusers"
    assert (got - expected).abs().max().item() <= TOL * expected.abs().max().item()


def test_bfl_names_ai_toolkit_and_fal_style(peft_pair, tmp_path):
    ours, lora_sd, expected = peft_pair
    bfl = _to_bfl(lora_sd, ALPHA / RANK)
    for name, sd in (("ai-toolkit", bfl), ("fal", {k.replace("diffusion_model.", "base_model.model."): v
                                                  for k, v in bfl.items()})):  # fmt: skip
        lora, got = _run(ours, _save(tmp_path, name, sd))
        assert lora.format == "bfl"
        assert (got - expected).abs().max().item() <= TOL * expected.abs().max().item(), name


def test_kohya_musubi_layout_with_alpha(peft_pair, tmp_path):
    ours, lora_sd, expected = peft_pair
    bfl = _to_bfl(lora_sd, 1.0)  # unscaled: the alpha keys carry the scale
    sd = {}
    for k, v in bfl.items():
        module, part = k.removeprefix("diffusion_model.").rsplit(".lora_", 1)
        kohya = "lora_unet_" + module.replace(".", "_")
        sd[f"{kohya}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = v
        sd[f"{kohya}.alpha"] = torch.tensor(float(ALPHA))
    lora, got = _run(ours, _save(tmp_path, "kohya", sd))
    assert lora.format == "kohya"
    assert (got - expected).abs().max().item() <= TOL * expected.abs().max().item()


def test_lokr_matches_the_merged_weights(tmp_path):
    ref = diffusers_transformer(CFG)
    ours = Flux2Transformer(CFG).eval()
    ours.load_state_dict(transformer_from_diffusers(ref.state_dict()))
    g = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(2, 2, generator=g), torch.randn(96, 32, generator=g) * 0.05  # kron -> (192, 64): qkv
    m1 = torch.randn(4, 2, generator=g)  # with a (16, 128) factor -> (64, 256): single block linear2
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": w1, "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": w2}
    sd |= {"diffusion_model.single_blocks.1.linear2.lokr_w1": m1, "diffusion_model.single_blocks.1.linear2.lokr_w2":
           torch.randn(16, 128, generator=g) * 0.05}  # fmt: skip
    lora, got = _run(ours, _save(tmp_path, "lokr", sd))
    assert lora.format.endswith("LoKr")
    with torch.no_grad():  # the reference: the same deltas merged by hand into diffusers' weights
        q, k, v = torch.kron(w1, w2).chunk(3)
        attn = ref.transformer_blocks[0].attn
        for lin, d in ((attn.to_q, q), (attn.to_k, k), (attn.to_v, v)):
            lin.weight += d
        ref.single_transformer_blocks[1].attn.to_out.weight += torch.kron(m1, sd[
            "diffusion_model.single_blocks.1.linear2.lokr_w2"])  # fmt: skip
    expected = _diffusers_out(ref, _inputs())
    assert (got - expected).abs().max().item() <= TOL * expected.abs().max().item()


def test_lycoris_lokr_matches_diffusers(tmp_path):
    """A LyCORIS LoKr file (SimpleTuner writes these: `lycoris_` + the diffusers module path with underscores),
    one factor full and one rank-decomposed with an alpha, changes our output as diffusers' loader does."""
    from diffusers import Flux2Pipeline

    ref = diffusers_transformer(CFG)
    ours = Flux2Transformer(CFG).eval()
    ours.load_state_dict(transformer_from_diffusers(ref.state_dict()))
    g = torch.Generator().manual_seed(6)
    sd = {"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": torch.randn(4, 4, generator=g),
          "lycoris_transformer_blocks_0_attn_to_q.lokr_w2": torch.randn(16, 16, generator=g) * 0.05,
          "lycoris_transformer_blocks_0_attn_to_k.lokr_w1": torch.randn(4, 4, generator=g),
          "lycoris_transformer_blocks_0_attn_to_k.lokr_w2_a": torch.randn(16, 3, generator=g) * 0.1,
          "lycoris_transformer_blocks_0_attn_to_k.lokr_w2_b": torch.randn(3, 16, generator=g) * 0.1,
          "lycoris_transformer_blocks_0_attn_to_k.alpha": torch.tensor(6.0),  # scale 6 / 3 (rank of w2_a @ w2_b)
          "lycoris_single_transformer_blocks_1_attn_to_out.lokr_w1": torch.randn(4, 4, generator=g),
          "lycoris_single_transformer_blocks_1_attn_to_out.lokr_w2": torch.randn(16, 64, generator=g) / 20}  # fmt: skip
    lora, got = _run(ours, _save(tmp_path, "lycoris", sd))
    assert lora.format == "lycoris LoKr"
    plain = _diffusers_out(ref, _inputs())
    ref.load_lora_adapter(Flux2Pipeline.lora_state_dict(dict(sd)), prefix="transformer")
    expected = _diffusers_out(ref, _inputs())
    assert (expected - plain).abs().max().item() > 1e-2  # the LoKr does something in diffusers too
    assert (got - expected).abs().max().item() <= TOL * expected.abs().max().item()


def test_fuse_unfuse_is_bit_exact_and_hooks_match_fuse(peft_pair, tmp_path):
    ours, lora_sd, _ = peft_pair
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    path = _save(tmp_path, "p", {f"transformer.{k}": v for k, v in lora_sd.items()})
    lora = load_lora(path, ours)
    second = load_lora(_save(tmp_path, "q", _to_bfl(lora_sd, 1.0)), ours)
    applied = apply_loras(ours, [(lora, 0.7), (second, -0.4)], mode="fuse")
    fused = _ours_out(ours, _inputs())
    assert any(not torch.equal(before[k], v) for k, v in ours.state_dict().items())
    applied.remove()
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())  # bit for bit
    applied = apply_loras(ours, [(lora, 0.7), (second, -0.4)], mode="hooks")
    hooked = _ours_out(ours, _inputs())
    applied.remove()
    assert (fused - hooked).abs().max().item() <= TOL * fused.abs().max().item()  # relative, as above
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


def test_keys_that_map_to_nothing_are_named(peft_pair, tmp_path):
    ours, lora_sd, _ = peft_pair
    sd = {f"transformer.{k}": v for k, v in lora_sd.items()}
    sd["transformer.not_a_layer.lora_A.weight"] = torch.zeros(4, 4)
    sd["text_encoder.layers.0.q.lora_A.weight"] = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"bad.safetensors: 2 LoRA key\(s\) map to no layer.*not_a_layer"):
        load_lora(_save(tmp_path, "bad", sd), ours)
    model = tmp_path / "model.safetensors"  # the model's own weights given as a LoRA (each key was listed)
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, model)
    with pytest.raises(ValueError, match=r"holds a model's own weights, not a LoRA .*give it as --weights"):
        load_lora(model, ours)
    ckpt = tmp_path / "lora.ckpt.safetensors"  # a training run's checkpoint (its keys under "lora.")
    save_file({f"lora.{k}": v for k, v in lora_sd.items()}, ckpt, metadata={"step": "3", "config": "{}"})
    with pytest.raises(ValueError, match=r"is a LoRA training checkpoint .*use the lora.safetensors its run wrote"):
        load_lora(ckpt, ours)


def test_pipeline_and_cli_take_several_loras_and_record_them(klein_folder, tmp_path):
    import subprocess
    import sys

    import numpy as np

    from flux2studio.loading import load

    _, folder = klein_folder
    pipe = load(weights=folder, device="cpu", dtype="fp32", resident=True)
    g = torch.Generator().manual_seed(9)
    qkv = pipe.transformer.double_blocks[0].img_attn.qkv.weight
    key = "diffusion_model.double_blocks.0.img_attn.qkv"
    a = {f"{key}.lora_A.weight": torch.randn(2, qkv.shape[1], generator=g),
         f"{key}.lora_B.weight": torch.randn(qkv.shape[0], 2, generator=g)}  # fmt: skip
    first = _save(tmp_path, "style", a)
    second = _save(tmp_path, "other", {k: v * 0.5 for k, v in a.items()})
    plain = np.asarray(pipe("p", size=(64, 64), steps=1)[0])
    pipe.set_loras([(first, 1.0), (second, 0.5)])
    styled = pipe("p", size=(64, 64), steps=1)[0]
    assert not np.array_equal(np.asarray(styled), plain)
    assert [lo["file"] for lo in json.loads(styled.info["flux2"])["loras"]] == [
        "style.safetensors",
        "other.safetensors",
    ]
    bad = _save(tmp_path, "bad", {"transformer.not_a_layer.lora_A.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="map to no layer"):
        pipe.set_loras([(bad, 1.0)])
    assert pipe("p", size=(64, 64), steps=1)[0].tobytes() == styled.tobytes()  # a file refused changes nothing
    pipe.set_loras([])
    assert np.array_equal(np.asarray(pipe("p", size=(64, 64), steps=1)[0]), plain)  # unfused exactly
    run = subprocess.run([sys.executable, "-m", "flux2studio.cli", "generate", "p", "--weights", str(folder),
                          "--lora", f"{first}:1.0", "--lora", f"{second}:0.5", "--size", "64x64", "--steps", "1",
                          "--dtype", "fp32", "-q", "-o", str(tmp_path / "l.png")],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    from PIL import Image

    cli = Image.open(tmp_path / "l.png")
    assert np.array_equal(np.asarray(cli), np.asarray(styled))  # the CLI's two LoRAs == the Python API's
    assert [(lo["file"], lo["scale"]) for lo in json.loads(cli.info["flux2"])["loras"]] == [
        ("style.safetensors", 1.0),
        ("other.safetensors", 0.5),
    ]


def test_a_lora_that_does_not_fit_is_refused_whole_before_anything_changes(tmp_path):
    """Found by a user's tour: a wrong-rank factor failed in the middle of a call with torch's message and left
    the layers applied before it changed (set_loras([]) did not restore the image); factors that merely
    broadcast ((1, R) up) were applied; another model's LoRA failed at run time; an empty file did nothing;
    NaN made a garbage image. Now each is one error at set_loras naming file and layer, and nothing changes."""
    from flux2studio.loading import load

    pipe = load("nano-base", device="cpu", dtype="fp32")
    plain = pipe("a red circle", steps=2, seed=0)[0]
    ok = {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 256) * 0.1,
          "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(768, 4) * 0.1,
          "double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(4, 256) * 0.1,
          "double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(256, 4) * 0.1}  # fmt: skip
    key = "double_blocks.0.img_attn.proj.lora_B.weight"
    cases = {
        "rank": ({**ok, key: torch.randn(256, 3)}, r"factors \(256, 3\) x \(4, 256\) do not multiply"),
        "broadcast": ({**ok, key: torch.randn(1, 4)}, "makes a 1x256 change; this model's layer is 256x256"),
        "other-model": ({**ok, key: torch.randn(3072, 4)}, "makes a 3072x256 change"),
        "nan": ({**ok, key: torch.full((256, 4), float("nan"))}, "holds NaN or infinite values"),
        "empty": ({}, "holds no LoRA layer"),
    }
    for name, (sd, message) in cases.items():
        save_file(sd, tmp_path / f"{name}.safetensors")
        with pytest.raises(ValueError, match=message):
            pipe.set_loras([(tmp_path / f"{name}.safetensors", 1.0)])
    save_file(ok, tmp_path / "ok.safetensors")
    pipe.set_loras([(tmp_path / "ok.safetensors", 1.0)])
    styled = pipe("a red circle", steps=2, seed=0)[0]
    assert styled.tobytes() != plain.tobytes() and 'Lora hashes: "ok: ' in styled.info["parameters"]  # (A1111's)
    pipe.set_loras([])
    assert pipe("a red circle", steps=2, seed=0)[0].tobytes() == plain.tobytes()
    fp8 = {
        "double_blocks.0.img_attn.qkv.lokr_w1": torch.eye(2).to(torch.float8_e4m3fn),  # LoKr in fp8: the
        "double_blocks.0.img_attn.qkv.lokr_w2": (torch.randn(384, 128) * 0.01).to(torch.float8_e4m3fn),
    }  # check
    save_file(fp8, tmp_path / "fp8.safetensors")  # widens it (torch has no isfinite for fp8; a review found it)
    pipe.set_loras([(tmp_path / "fp8.safetensors", 1.0)])
