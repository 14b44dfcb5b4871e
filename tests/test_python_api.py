"""The Python API as an application uses it: what it exports, the values it takes (numpy's, paths alone), its
errors before any work, a cancelled call, and making an image again from its metadata."""

import logging

import numpy as np
import pytest
from PIL import Image

import flux2studio
from flux2studio import GenerationSettings, load, read_metadata, save_png

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def nano():
    return load("nano")


def test_the_package_exports_its_api_for_ides():
    assert {"load", "Pipeline", "HostedPipeline", "GenerationSettings", "save_png", "read_metadata"} <= set(
        dir(flux2studio)
    )
    assert flux2studio.Pipeline.__name__ == "Pipeline"
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        flux2studio.nothing  # noqa: B018
    assert "Pipeline(nano" in repr(load("nano"))


def test_numpy_values_are_taken_as_python_ones(nano):
    seed, steps, side = np.int64(3), np.int64(2), np.int64(128)
    a = nano(PROMPT, seed=seed, steps=steps, size=(side, side))[0]
    b = nano(PROMPT, seed=3, steps=2, size=(128, 128))[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))  # (each was a ValueError naming np.int64)
    array = np.asarray(b)  # an RGB uint8 array (Gradio's, OpenCV's after a colour swap) as an image
    c = nano("the same circle", image=array, strength=0.5, steps=2, seed=1)[0]
    d = nano("the same circle", image=b, strength=0.5, steps=2, seed=1)[0]
    assert np.array_equal(np.asarray(c), np.asarray(d))
    with pytest.raises(ValueError, match=r"start image: an array must be uint8 .* got float32 \(8, 8\)"):
        nano.check(PROMPT, image=np.zeros((8, 8), np.float32))


def test_bad_calls_are_errors_before_any_work(nano, tmp_path):
    for prompt in (None, 5):  # (Python's "not iterable")
        with pytest.raises(ValueError, match="prompt must be a string or a non-empty list of strings, got"):
            nano.check(prompt)
    with pytest.raises(ValueError, match=r"callback '<lambda>' must take three arguments"):  # (after a step)
        nano(PROMPT, callback=lambda step: None)
    wide = Image.new("RGB", (1024, 128))  # the size comes from the reference: say so
    with pytest.raises(ValueError, match=r"height 32 .* the size was taken from reference 0 \(1024x128\)"):
        nano.check(PROMPT, refs=[wide])
    path = tmp_path / "closed.png"
    Image.new("RGB", (64, 64)).save(path)
    with Image.open(path) as lazy:
        pass  # closed before its pixels were read
    with pytest.raises(ValueError, match="reference 0 cannot be read"):
        nano.check(PROMPT, refs=[lazy])
    with pytest.raises(ValueError, match=r"list of files or \(file, scale\) pairs: set_loras\(\[\('a.safetensors'"):
        nano.set_loras(("a.safetensors", 1.0))
    with pytest.raises(FileNotFoundError, match=r"LoRA file not found: absent\.safetensors"):  # a path alone: scale 1
        nano.set_loras(["absent.safetensors"])
    assert load("nano", dtype="float32").dtype == load("nano", dtype="fp32").dtype  # torch's names, as images say
    with pytest.raises(ValueError, match="model_id must be a model's name"):  # (difflib's TypeError)
        load(123)
    with pytest.raises(ValueError, match="resident must be True or False, got 'no'"):
        load("nano", resident="no")


def test_a_cancelled_call_frees_what_it_loaded_loras_or_not(klein_folder, tmp_path):
    import gc
    import weakref

    import torch
    from safetensors.torch import save_file

    _, folder = klein_folder
    pipe = load(weights=folder, device="cpu")

    class Cancel(Exception):
        pass

    def cancel(step, steps, x0):
        raise Cancel

    with pytest.raises(Cancel):
        pipe(PROMPT, size=(64, 64), steps=2, callback=cancel)
    assert not any(part.loaded for part in pipe.parts.values())  # (the transformer stayed loaded)
    qkv = pipe.transformer.double_blocks[0].img_attn.qkv  # (loaded for its shape, then released)
    pipe.release("transformer")
    name = "diffusion_model.double_blocks.0.img_attn.qkv"
    save_file({f"{name}.lora_A.weight": torch.randn(2, qkv.in_features),
               f"{name}.lora_B.weight": torch.randn(qkv.out_features, 2)}, tmp_path / "l.safetensors")  # fmt: skip
    pipe.set_loras([tmp_path / "l.safetensors"])
    loaded = []
    load_transformer = pipe.parts["transformer"]._load
    pipe.parts["transformer"]._load = lambda: loaded.append(weakref.ref(m := load_transformer())) or m
    pipe(PROMPT, size=(64, 64), steps=1)
    with pytest.raises(Cancel):
        pipe(PROMPT, size=(64, 64), steps=2, callback=cancel)
    del qkv
    gc.collect()
    assert len(loaded) == 2 and not any(ref() for ref in loaded)  # (its LoRA state held each one)


def test_a_prompt_cut_at_the_token_limit_is_said(nano, caplog):
    with caplog.at_level(logging.WARNING, logger="flux2studio"):
        nano.check(PROMPT)
        nano("a cat holding a sign " * 40 + "in red", steps=1, prompt_upsampling=False)
    assert "prompt 0 fills the text encoder's 64 tokens: what comes after is left out" in caplog.text


def test_an_image_is_made_again_from_its_metadata(nano, tmp_path):
    image = nano(PROMPT, seed=7, steps=2)[0]
    path = save_png(image, tmp_path / "a.png")
    meta = read_metadata(path)
    again = load(meta["model"], dtype=meta["dtype"], attention=meta["attention"])
    replay = again(GenerationSettings.from_metadata(meta))[0]
    assert np.array_equal(np.asarray(replay), np.asarray(Image.open(path)))
    edit = nano("a blue circle", image=image, strength=0.6, steps=2, seed=1)[0]
    meta = read_metadata(save_png(edit, tmp_path / "b.png"))
    with pytest.raises(ValueError, match="made from a start image: give it as image="):
        GenerationSettings.from_metadata(meta)
    replay = nano(GenerationSettings.from_metadata(meta, image=image))[0]
    assert np.array_equal(np.asarray(replay), np.asarray(edit))
    with pytest.raises(ValueError, match="an image's metadata, not a stored settings row: use from_metadata"):
        GenerationSettings.from_json(meta)
