"""LoRA training on a Base model (tiny klein-base folder): runs, resumes, saves layouts diffusers loads."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flux2studio.images import image_hash
from flux2studio.loading import load
from flux2studio.lora import load_lora
from flux2studio.train.lora import LoraTrainConfig, read_dataset, train_lora, training_image


@pytest.fixture
def dataset(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(96, 64), (64, 96), (80, 80)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a pattern number {i}")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"img{i}.ref.png")
    return data


def _cfg(dataset, tmp_path, **kw):
    return LoraTrainConfig(data=str(dataset), out=str(tmp_path / "run"), rank=4, alpha=8, lr=1e-2, steps=3,
                           resolution=64, ckpt_every=1, save_kohya=True, **kw)  # fmt: skip


def test_train_save_and_diffusers_loads_it(klein_folder, dataset, tmp_path):
    pipe, folder = klein_folder
    ours = load("klein-base-4b", weights=folder, device="cpu", dtype="fp32")
    rows = []
    path = train_lora(ours, _cfg(dataset, tmp_path), rows.append)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    # the pipeline trained with is as it was: layers unwrapped (its images had the LoRA in them, recorded as
    # plain, and set_loras failed), the transformer loaded per phase again
    assert not any(hasattr(m, "base_layer") for m in ours.transformer.modules())
    assert not ours.parts["transformer"].resident
    ours.set_loras([path])
    assert json.loads(ours("a pattern", size=(64, 64), steps=1)[0].info["flux2"])["loras"]
    assert path.name == "lora.safetensors" and (path.parent / "lora.kohya.safetensors").is_file()
    # diffusers reads the file with its own loader and gets the same transformer output as ours
    fresh = load("klein-base-4b", weights=folder, device="cpu", dtype="fp32", resident=True)
    lora = load_lora(path, fresh.transformer)
    assert lora.format == "diffusers"
    kohya = load_lora(path.parent / "lora.kohya.safetensors", fresh.transformer)
    assert kohya.format == "kohya"
    pipe.load_lora_weights(str(path))
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, 16, 128, generator=g), torch.randn(1, 6, 96, generator=g)
    from flux2studio.lora import apply_loras
    from flux2studio.sampling import image_ids, text_ids

    with torch.no_grad():
        expected = pipe.transformer(hidden_states=img, encoder_hidden_states=txt, timestep=torch.tensor([0.5]),
                                    img_ids=image_ids(4, 4), txt_ids=text_ids(6), return_dict=False)[0]  # fmt: skip
        applied = apply_loras(fresh.transformer, [(lora, 1.0)])
        got = fresh.transformer(img, image_ids(4, 4), txt, text_ids(6), torch.tensor([0.5]))
        applied.remove()
        base = fresh.transformer(img, image_ids(4, 4), txt, text_ids(6), torch.tensor([0.5]))
    pipe.unload_lora_weights()
    # fp32; outputs reach ~13 here, so the bound is relative: 1e-5 of the largest value (measured 1.3e-6)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert (got - base).abs().max().item() > 1e-4  # the LoRA learned something


def test_resume_and_edit_mode(klein_folder, dataset, tmp_path):
    _, folder = klein_folder
    first = load("klein-base-4b", weights=folder, device="cpu", dtype="fp32")
    edit = _cfg(dataset, tmp_path, mode="edit", sample_every=3, sample_prompts=("a pattern",))
    train_lora(first, edit, lambda r: None)
    with Image.open(tmp_path / "run" / "sample-00003-0.png") as im:  # edit-mode samples edit the first reference
        assert json.loads(im.info["flux2"])["refs"] == [image_hash(training_image(dataset / "img0.ref.png"))]
    more = load("klein-base-4b", weights=folder, device="cpu", dtype="fp32")
    rows = []
    cfg = dataclasses.replace(edit, steps=5)
    train_lora(more, cfg, rows.append)
    assert [r["step"] for r in rows] == [4, 5]  # resumed after step 3
    again = []  # the same command once more: nothing left to train, the same LoRA
    fresh = load("klein-base-4b", weights=folder, device="cpu", dtype="fp32")
    assert train_lora(fresh, cfg, again.append).exists() and again == []
    as_given_else = dataclasses.replace(cfg, data=f"{cfg.data}/.")  # the same folder, written otherwise
    assert train_lora(fresh, as_given_else, again.append).exists() and again == []  # (was "other settings")
    with pytest.raises(ValueError, match=r"lora.ckpt.safetensors is at step 5, past --steps 4: pass --steps 5 or more"):
        train_lora(more, dataclasses.replace(cfg, steps=4), print)
    with pytest.raises(ValueError, match=r"is a run with other settings \(rank 4 -> 8; lr 0.01 -> 0.001\)"):
        train_lora(more, dataclasses.replace(cfg, rank=8, lr=1e-3, steps=9), print)


def test_edit_batches_keep_reference_sizes_apart(klein_folder, tmp_path):
    """Edit mode, batches of two: targets of one bucket whose references differ in size never share a batch
    (their reference tokens could not be stacked)."""
    _, folder = klein_folder
    data = tmp_path / "edit"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate([(64, 64), (96, 64)]):  # the references' sizes
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"edit number {i}")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(data / f"img{i}.ref.png")
    rows = []
    cfg = dataclasses.replace(_cfg(data, tmp_path, mode="edit"), batch=2, steps=4)
    train_lora(load("klein-base-4b", weights=folder, device="cpu", dtype="fp32"), cfg, rows.append)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)


def test_datasets_in_the_layouts_trainers_share(tmp_path, caplog):
    """kohya's N_name subfolders and .caption files, Hugging Face's metadata.jsonl (file_name, text): each was
    refused ("no training samples", "no caption file"); other image types and subfolders are said, not skipped
    silently."""
    image = Image.new("RGB", (64, 64), "gold")
    kohya = tmp_path / "kohya"
    (kohya / "10_gold").mkdir(parents=True)
    image.save(kohya / "10_gold" / "a.png")
    (kohya / "10_gold" / "a.caption").write_text("a gold square")
    image.save(kohya / "b.bmp")
    (kohya / "2024_trip").mkdir()  # a folder of photos named like kohya's, without captions: not read
    image.save(kohya / "2024_trip" / "p.png")
    assert [(s.image.name, s.caption) for s in read_dataset(kohya, "t2i")] == [("a.png", "a gold square")]
    assert "left out 2024_trip, b.bmp" in caplog.text
    (tmp_path / "latin.jsonl").write_bytes('{"image": "a.png", "caption": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.jsonl: not UTF-8 text"):
        read_dataset(tmp_path / "latin.jsonl", "t2i")
    hf = tmp_path / "hf"
    hf.mkdir()
    image.save(hf / "0.png")
    (hf / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a gold square"}\n')
    assert [(s.image.name, s.caption) for s in read_dataset(hf, "t2i")] == [("0.png", "a gold square")]


def test_an_interrupted_run_keeps_its_last_step(klein_folder, dataset, tmp_path):
    """Ctrl+C saves the checkpoint at the last finished step (the steps since the last checkpoint were lost)."""
    from flux2studio.train.common import checkpoint_meta

    _, folder = klein_folder

    def interrupt_after_step_2(row: dict) -> None:
        if row["step"] == 2:
            raise KeyboardInterrupt

    cfg = dataclasses.replace(_cfg(dataset, tmp_path), ckpt_every=100)
    with pytest.raises(KeyboardInterrupt):
        train_lora(load("klein-base-4b", weights=folder, device="cpu", dtype="fp32"), cfg, interrupt_after_step_2)
    assert checkpoint_meta(tmp_path / "run" / "lora.ckpt.safetensors")["step"] == "2"


def test_a_rank_above_the_models_width_is_refused():
    from flux2studio.train.lora import check_rank
    from flux2studio.variants import get_variant

    check_rank(get_variant("nano-base"), 256)
    with pytest.raises(ValueError, match=r"rank 512 is above nano-base's width 256: .*--rank 1\.\.256"):
        check_rank(get_variant("nano-base"), 512)  # (100000 ran the machine out of memory)


def test_bad_data_is_named(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"has no caption file a\.txt"):
        read_dataset(tmp_path, "t2i")
    (tmp_path / "a.txt").write_text("a caption")
    with pytest.raises(ValueError, match=r"cannot read training image .*a\.png"):  # before loading a model
        read_dataset(tmp_path, "t2i")
    with pytest.raises(FileNotFoundError, match=r"neither a folder nor a \.jsonl"):
        read_dataset(tmp_path / "missing", "t2i")
    whole = tmp_path / "whole.png"
    Image.new("RGB", (64, 64)).save(whole)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "a.png").write_bytes(whole.read_bytes()[:-40])  # truncated: its header reads
    (tmp_path / "half" / "a.txt").write_bytes("\ufeffa caption".encode())
    with pytest.raises(ValueError, match=r"cannot read training image .*a\.png"):  # (found after the model loaded)
        read_dataset(tmp_path / "half", "t2i")
    (tmp_path / "half" / "a.png").write_bytes(whole.read_bytes())
    assert read_dataset(tmp_path / "half", "t2i")[0].caption == "a caption"  # (the byte-order mark was kept)
    (tmp_path / "half" / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"a\.txt: not UTF-8 text"):
        read_dataset(tmp_path / "half", "t2i")
    for caption in ('["a", "b"]', "null", "42"):  # (Python's errors, after the model loaded)
        (tmp_path / "d.jsonl").write_text(f'{{"image": "whole.png", "caption": {caption}}}\n')
        with pytest.raises(ValueError, match=r"d\.jsonl line 1: caption must be text"):
            read_dataset(tmp_path / "d.jsonl", "t2i")


def test_distilled_models_are_refused(klein_folder, dataset, tmp_path):
    _, folder = klein_folder
    with pytest.raises(ValueError, match="train LoRAs on a Base variant"):
        train_lora(load("klein-4b", weights=folder, device="cpu", dtype="fp32"), _cfg(dataset, tmp_path), print)


def test_grad_checkpointing_trains_the_same_lora(klein_folder, dataset, tmp_path):
    """Recomputing block activations in backward saves memory and changes nothing: the same LoRA comes out
    (also a check that the seed fixes the LoRA's initial factors, which PEFT draws from torch's generator)."""
    _, folder = klein_folder
    files = []
    for gc in (False, True):
        pipe = load("klein-base-4b", weights=folder, device="cpu", dtype="fp32")
        cfg = dataclasses.replace(_cfg(dataset, tmp_path / str(gc), grad_checkpointing=gc), batch=2)
        files.append(load_file(str(train_lora(pipe, cfg, lambda r: None))))
    assert files[0].keys() == files[1].keys()
    assert all(torch.equal(files[0][k], files[1][k]) for k in files[0])  # bit for bit (same seed, same data)


def test_cli_trains_from_a_jsonl_with_samples(klein_folder, dataset, tmp_path, cli):
    """`flux2 train lora` end to end: a .jsonl data set, batches of two in aspect buckets, gradient
    checkpointing, a sample image every 2 steps at the training resolution (the text encoder and VAE come back
    for it), progress with the loss, and a LoRA file that loads. Bad sample settings stop it before any work."""
    _, folder = klein_folder
    rows = [{"image": f"img{i}.png", "caption": f"a pattern number {i}"} for i in range(3)]
    (dataset / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    args = ["train", "lora", dataset / "data.jsonl", "--model", "klein-base-4b", "--weights", folder,
            "--dtype", "fp32", "--device", "cpu", "--rank", "4", "--alpha", "4", "--lr", "1e-2", "--steps", "4",
            "--batch", "2", "--resolution", "64", "--grad-checkpointing", "--sample-every", "2",
            "--sample-prompt", "a pattern", "--out", out]  # fmt: skip
    bad = cli(*args, "--sample-steps", "0")
    assert bad.returncode == 2 and "steps 0 is out of range 1.." in bad.stderr and not out.exists()
    run = cli(*args, "--sample-steps", "2")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith(f"{out / 'lora.safetensors'}  rank 4  4 steps")
    assert "loss=" in run.stderr and "4/4" in run.stderr  # the progress bar
    samples = sorted(p.name for p in out.glob("sample-*.png"))
    assert samples == ["sample-00002-0.png", "sample-00004-0.png"]
    with Image.open(out / "sample-00004-0.png") as im:
        assert im.size == (64, 64) and json.loads(im.info["flux2"])["steps"] == 2
    pipe = load("klein-base-4b", weights=folder, device="cpu", dtype="fp32", resident=True)
    assert load_lora(out / "lora.safetensors", pipe.transformer).format == "diffusers"


def test_the_default_resolution_is_512_within_the_models_sides():
    """nano-base takes sides up to 256: a default of 512 failed its first sample (a user's tour)."""
    from flux2studio.train.lora import default_resolution
    from flux2studio.variants import get_variant

    assert default_resolution(get_variant("nano-base")) == 256
    assert default_resolution(get_variant("klein-base-4b")) == default_resolution(get_variant("klein-base-9b")) == 512


def test_training_images_are_upright_and_16_bit_greys_scaled(tmp_path):
    """A phone photo (EXIF orientation 6) trains as it is seen, upright, and a 16-bit grey as its greys, as the
    pipelines read references (they trained on their sideways pixels, and a 16-bit grey as white)."""
    photo = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    photo.save(tmp_path / "photo.jpg", exif=exif)
    assert training_image(tmp_path / "photo.jpg").size == (30, 40)
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "grey.png")
    assert training_image(tmp_path / "grey.png").getpixel((0, 0)) == (128, 128, 128)


def test_training_without_peft_says_how_to_install_it(monkeypatch):
    """peft is the `train` extra: without it, one line saying how to add it (was "No module named 'peft'", after
    the model had loaded and the latents were made)."""
    import sys

    from flux2studio.train.lora import import_peft

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"LoRA training needs peft: pip install 'flux2studio\[train\]'"):
        import_peft()
