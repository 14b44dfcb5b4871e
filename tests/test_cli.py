"""The command line on a tiny klein folder saved by diffusers: the first test through the real `python -m`
entry in fresh processes, the others in this process (the `cli` fixture) to spare an interpreter start each."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, PngImagePlugin


def flux2(*args):
    return subprocess.run([sys.executable, "-m", "flux2studio.cli", *map(str, args)], capture_output=True, text=True)


def common(folder):
    return ["--weights", folder, "--dtype", "fp32", "--device", "cpu", "--steps", "2", "-q"]


def test_generate_writes_metadata_and_from_reproduces_bit_identical(klein_folder, tmp_path):
    _, folder = klein_folder
    first = tmp_path / "a.png"
    run = flux2("generate", "a red circle", *common(folder), "--size", "80x64", "--seed", "5", "-o", first)
    assert run.returncode == 0, run.stderr
    summary = run.stdout.strip().splitlines()[-1]
    assert str(first) in summary and "seed 5" in summary and "80x64" in summary
    image = Image.open(first)
    meta = json.loads(image.info["flux2"])
    assert meta["prompt"] == "a red circle" and meta["seed"] == 5 and meta["steps"] == 2
    assert (meta["width"], meta["height"]) == (80, 64) and meta["model"] == "klein-4b"
    assert len(meta["weights_hash"]) == 12 and meta["version"]
    assert image.info["parameters"].startswith("a red circle\nSteps: 2, Sampler: Euler (flow)")
    again = tmp_path / "b.png"
    run = flux2("generate", "--from", first, "--weights", folder, "--device", "cpu", "-q", "-o", again)
    assert run.returncode == 0, run.stderr
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(image))  # bit-identical


def test_notes_go_to_stderr_and_quiet_keeps_warnings_only(tmp_path, cli):
    """Why the input was changed (a large reference downscaled) is one line on stderr; `-q` keeps only warnings."""
    big = tmp_path / "big.png"
    Image.new("RGB", (1200, 1000), (200, 30, 30)).save(big)
    run = cli("generate", "a red circle", "--ref", big, "--steps", "1", "-o", tmp_path / "a.png")
    assert run.returncode == 0, run.stderr
    assert "reference 0 resized from 1200x1000" in run.stderr
    quiet = cli("generate", "a red circle", "--ref", big, "--steps", "1", "-q", "-o", tmp_path / "b.png")
    assert quiet.returncode == 0, quiet.stderr
    assert "resized" not in quiet.stderr


def test_never_overwrites_silently(klein_folder, tmp_path, cli):
    _, folder = klein_folder
    out = tmp_path / "x.png"
    assert cli("generate", "p", *common(folder), "--size", "64x64", "-o", out).returncode == 0
    run = cli("generate", "p", *common(folder), "--size", "64x64", "-o", out)
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {out} exists: choose another -o, a folder, or pass --overwrite"
    # into a folder: free names, nothing replaced
    for _ in range(2):
        assert cli("generate", "p", *common(folder), "--size", "64x64", "-o", tmp_path / "dir").returncode == 0
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["klein-4b-0-1.png", "klein-4b-0.png"]


def test_prompts_file_with_per_line_settings(klein_folder, tmp_path, cli):
    _, folder = klein_folder
    batch = tmp_path / "batch.jsonl"
    batch.write_text('{"prompt": "a", "seed": 3, "size": "64x96"}\n{"prompt": "b", "num": 2}\n')
    run = cli("generate", "--prompts", batch, *common(folder), "--size", "64x64", "-o", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    files = sorted((tmp_path / "out").iterdir())
    assert len(files) == 3
    assert sorted(Image.open(f).size for f in files) == [(64, 64), (64, 64), (64, 96)]
    assert sorted(json.loads(Image.open(f).info["flux2"])["seed"] for f in files) == [0, 1, 3]


def test_edit_follows_the_first_image_size_and_aspect_presets(klein_folder, tmp_path, cli):
    _, folder = klein_folder
    Image.new("RGB", (96, 64), "red").save(tmp_path / "ref.png")
    run = cli("edit", tmp_path / "ref.png", "make it blue", *common(folder), "-o", tmp_path / "e.png")
    assert run.returncode == 0, run.stderr
    edited = Image.open(tmp_path / "e.png")
    assert edited.size == (96, 64)
    assert len(json.loads(edited.info["flux2"])["refs"]) == 1


def test_compare_makes_a_labelled_grid_and_single_images(klein_folder, tmp_path, cli):
    _, folder = klein_folder
    run = cli("compare", "a cat", "--models", "klein-4b,klein-base-4b", "--seeds", "1,2", *common(folder),
                "--size", "64x64", "-o", tmp_path / "cmp")  # fmt: skip
    assert run.returncode == 0, run.stderr
    names = sorted(p.name for p in (tmp_path / "cmp").iterdir())
    assert names == ["grid.png", "klein-4b-1.png", "klein-4b-2.png", "klein-base-4b-1.png", "klein-base-4b-2.png"]
    assert Image.open(tmp_path / "cmp" / "grid.png").size == (2 * 64, 2 * (64 + 18))


def test_errors_are_one_actionable_line(tmp_path, klein_folder, cli):
    _, folder = klein_folder
    cases = [
        (("generate", "p", "--model", "klien-4b"), "unknown model 'klien-4b'. Did you mean 'klein-4b'?"),
        (("generate", "p", "--model", "klein-4b"), "run `flux2 pull klein-4b`"),
        (("generate", "p", *common(folder), "--size", "100x64"), "width 100 is not a multiple of 16"),
        (("generate", "p", *common(folder), "--ref", tmp_path / "missing.png"), "cannot read reference image"),
        (("generate", "p", *common(folder), "--guidance", "3"), "guidance-distilled and ignores guidance"),
        (("generate", "p", "--stepz", "3"), "unrecognized arguments: --stepz 3"),  # (argparse: usage, 4 lines)
        (("generate", "p", "--device", "gpu0"), "device 'gpu0' is not a device name"),  # (PyTorch's own list)
        (("generate", "p", "--model", "nano-base", "--lora", tmp_path), f"{tmp_path} is a folder"),  # (not found)
    ]
    for args, message in cases:
        run = cli(*args)
        assert run.returncode == 2, (args, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], run.stderr
    from flux2studio.cli import main

    with pytest.raises(ValueError, match="unknown model 'klien-4b'"):  # --debug: the exception, its traceback
        main(["--debug", "generate", "p", "--model", "klien-4b"])


def test_models_shows_downloaded_weights_and_generate_finds_them(klein_folder, tmp_path, cli, monkeypatch):
    import shutil

    from huggingface_hub import constants

    _, folder = klein_folder
    cache = tmp_path / "hub"
    entry = cache / "models--black-forest-labs--FLUX.2-klein-4B"
    shutil.copytree(folder, entry / "snapshots" / "0123abc")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123abc")
    # what HF_HUB_CACHE / HF_HUB_OFFLINE set at start-up (huggingface_hub reads them into these at import)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run = cli("models", "--json")
    present = {r["id"]: r["present"] for r in json.loads(run.stdout)}
    assert present["klein-4b"] and not present["klein-9b"]
    run = cli("generate", "p", "--model", "klein-4b", "--size", "64x64", "--steps", "1", "--dtype", "fp32", "-q",
              "-o", tmp_path / "k.png")  # fmt: skip
    assert run.returncode == 0, run.stderr


def test_from_reuses_the_recorded_attention(klein_folder, tmp_path, cli):
    """bf16 images depend on the attention kernel's rounding: --from runs the one the image records
    (PyTorch's for images made before the kernel, which record none)."""
    from flux2studio.checkpoints import cache_dir
    from flux2studio.kernels.attention import unavailable_reason

    def pixels(name):
        return np.asarray(Image.open(tmp_path / name))

    _, folder = klein_folder
    base = ["--weights", folder, "--device", "cpu", "--steps", "2", "-q", "--size", "128x96"]
    modes = ["sdpa"] + ([] if unavailable_reason(cache_dir()) else ["kernel"])
    for mode in modes:
        first, again = tmp_path / f"{mode}.png", tmp_path / f"{mode}-again.png"
        run = cli("generate", "a red circle", *base, "--dtype", "bf16", "--attention", mode, "-o", first)
        assert run.returncode == 0, run.stderr
        assert json.loads(Image.open(first).info["flux2"])["attention"] == mode
        run = cli("generate", "--from", first, *base[:4], "-q", "-o", again)
        assert run.returncode == 0, run.stderr
        assert json.loads(Image.open(again).info["flux2"])["attention"] == mode
        assert np.array_equal(pixels(f"{mode}-again.png"), pixels(f"{mode}.png"))
    if "kernel" in modes:  # else the test could not tell the two apart
        assert not np.array_equal(pixels("sdpa.png"), pixels("kernel.png"))
    old = Image.open(tmp_path / f"{modes[-1]}.png")
    meta = json.loads(old.info["flux2"])
    del meta["attention"]
    info = PngImagePlugin.PngInfo()
    info.add_text("flux2", json.dumps(meta))
    old.save(tmp_path / "old.png", pnginfo=info)
    run = cli("generate", "--from", tmp_path / "old.png", *base[:4], "-q", "-o", tmp_path / "old-again.png")
    assert run.returncode == 0, run.stderr
    assert np.array_equal(pixels("old-again.png"), pixels("sdpa.png"))


def test_guidance_interval_is_a_flag_recorded_in_the_image_and_replayed(tmp_path, cli):
    """`--guidance-interval 0,0.9` guides nano-base at t <= 0.9 only (another image than every step, the
    default); the interval is in the metadata, `--from` replays it, and an image from before it was recorded
    replays as 0,1."""

    def pixels(name):
        return np.asarray(Image.open(tmp_path / name))

    base = ["a red circle", "--model", "nano-base", "--steps", "6", "--seed", "3", "-q", "-o"]
    for name, extra in (("limited.png", ["--guidance-interval", "0,0.9"]), ("every.png", [])):
        run = cli("generate", *base, tmp_path / name, *extra)
        assert run.returncode == 0, run.stderr
    meta = json.loads(Image.open(tmp_path / "limited.png").info["flux2"])
    assert meta["guidance_interval"] == [0.0, 0.9] and meta["guidance"] == 4.0
    assert "CFG scale: 4.0, CFG interval: 0.0-0.9," in Image.open(tmp_path / "limited.png").info["parameters"]
    assert not np.array_equal(pixels("limited.png"), pixels("every.png"))

    old = Image.open(tmp_path / "every.png")
    meta = json.loads(old.info["flux2"])
    del meta["guidance_interval"]
    info = PngImagePlugin.PngInfo()
    info.add_text("flux2", json.dumps(meta))
    old.save(tmp_path / "old.png", pnginfo=info)
    for source, again in (("limited.png", "limited-again.png"), ("old.png", "old-again.png")):
        run = cli("generate", "--from", tmp_path / source, "-q", "-o", tmp_path / again)
        assert run.returncode == 0, run.stderr
    assert np.array_equal(pixels("limited-again.png"), pixels("limited.png"))
    assert np.array_equal(pixels("old-again.png"), pixels("every.png"))

    bad = ["generate", "a red circle", "-o", tmp_path / "x.png", "--guidance-interval"]
    run = cli(*bad, "0.9", "--model", "nano-base")
    assert run.returncode == 2 and "guidance interval '0.9' is not LOW,HIGH" in run.stderr
    run = cli(*bad, "0,0.9", "--model", "nano")
    assert run.returncode != 0 and "nano does not run classifier-free guidance" in run.stderr


def test_guidance_interval_in_compare_and_prompt_files(tmp_path, cli):
    """compare gives the interval (and the negative prompt) to the models that run CFG only; a prompts file
    may write it as on the command line."""
    from flux2studio.cli import jobs_from_file

    run = cli("compare", "a red circle", "--models", "nano,nano-base", "--seeds", "0", "--steps", "2",
                "--guidance-interval", "0,0.9", "--negative", "blurry", "-o", tmp_path / "cmp")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "cmp" / "grid.png").exists()
    meta = json.loads(Image.open(tmp_path / "cmp" / "nano-base-0.png").info["flux2"])
    assert meta["guidance_interval"] == [0.0, 0.9] and meta["negative_prompt"] == "blurry"

    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "a", "guidance_interval": "0,0.9"}\n{"prompt": "b", "guidance_interval": [0.1, 1]}\n')
    assert [j.guidance_interval for _, j in jobs_from_file(str(rows), {})] == [(0.0, 0.9), [0.1, 1]]


def test_prompt_upsampling_is_on_for_nano_recorded_and_replayed(klein_folder, tmp_path, cli):
    """nano plans what the prompt leaves free by default; the planned caption is in the metadata, `--from`
    replays either way exactly, and a model with no upsampler refuses the flag by name."""

    def pixels(name):
        return np.asarray(Image.open(tmp_path / name))

    base = ["a circle and a square", "--seed", "4", "-q", "-o"]
    for name, extra in (("planned.png", []), ("plain.png", ["--no-prompt-upsampling"])):
        run = cli("generate", *base, tmp_path / name, *extra)
        assert run.returncode == 0, run.stderr
    planned = json.loads(Image.open(tmp_path / "planned.png").info["flux2"])
    plain = json.loads(Image.open(tmp_path / "plain.png").info["flux2"])
    assert planned["prompt"] == plain["prompt"] == "a circle and a square"
    assert planned["prompt_upsampling"] and "upsampled_prompt" not in plain and not plain["prompt_upsampling"]
    assert planned["upsampled_prompt"].count(" in ") + planned["upsampled_prompt"].count(" at ") >= 2  # cells
    assert not np.array_equal(pixels("planned.png"), pixels("plain.png"))
    for source in ("planned.png", "plain.png"):
        run = cli("generate", "--from", tmp_path / source, "-q", "-o", tmp_path / f"again-{source}")
        assert run.returncode == 0, run.stderr
        assert np.array_equal(pixels(f"again-{source}"), pixels(source))
    run = cli("generate", "a cat", *common(klein_folder[1]), "--prompt-upsampling", "-o", tmp_path / "k.png")
    assert run.returncode != 0 and "klein-4b has no prompt upsampler" in run.stderr


def _photo(path, size=(96, 64)):
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_inpainting_and_image_to_image_from_the_cli_are_replayed_bit_for_bit(klein_folder, tmp_path, cli):
    _, folder = klein_folder
    photo = _photo(tmp_path / "photo.png")
    mask = Image.new("L", (48, 32), 0)
    mask.paste(255, (0, 0, 24, 16))
    mask.save(tmp_path / "mask.png")
    run = cli("edit", photo, "a red ball", "--mask", tmp_path / "mask.png", "--strength", "0.8",
                *common(folder), "-o", tmp_path / "in.png")  # fmt: skip
    assert run.returncode == 0, run.stderr
    meta = json.loads(Image.open(tmp_path / "in.png").info["flux2"])
    assert meta["init"]["strength"] == 0.8 and meta["init"]["mask"] and meta["refs"] == []
    assert (meta["width"], meta["height"]) == (96, 64)
    again = cli("generate", "--from", tmp_path / "in.png", "--init", photo, "--mask", tmp_path / "mask.png",
                "--weights", folder, "--device", "cpu", "-q", "-o", tmp_path / "again.png")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(tmp_path / "in.png")))
    missing = cli("generate", "--from", tmp_path / "in.png", "--init", photo, "--weights", folder, "-q",
                    "-o", tmp_path / "x.png")  # fmt: skip
    assert missing.returncode == 2 and "made from a mask with hash" in missing.stderr and "--mask" in missing.stderr
    other = cli("generate", "--from", tmp_path / "in.png", "--init", tmp_path / "mask.png", "--mask",
                  tmp_path / "mask.png", "--weights", folder, "-q", "-o", tmp_path / "x.png")  # fmt: skip
    assert other.returncode == 2 and "is not the image" in other.stderr

    run = cli("generate", "a blue sky", "--init", photo, "--strength", "0.6", *common(folder),
                "-o", tmp_path / "i2i.png")  # fmt: skip
    assert run.returncode == 0, run.stderr
    meta = json.loads(Image.open(tmp_path / "i2i.png").info["flux2"])
    assert meta["init"]["strength"] == 0.6 and meta["init"]["mask"] is None
    bad = cli("generate", "a blue sky", "--strength", "0.6", *common(folder), "-o", tmp_path / "y.png")
    assert bad.returncode == 2 and "--strength edits a start image: give it with --init IMAGE" in bad.stderr


def test_outpainting_from_the_cli_with_expand_or_canvas(klein_folder, tmp_path, cli):
    _, folder = klein_folder
    photo = _photo(tmp_path / "photo.png", (64, 64))
    run = cli("edit", photo, "--expand", "0,0,32,0", "more sky", *common(folder), "-o", tmp_path / "wide.png")
    assert run.returncode == 0, run.stderr
    wide = Image.open(tmp_path / "wide.png")
    assert wide.size == (96, 64) and np.array_equal(np.asarray(wide)[:, :64], np.asarray(Image.open(photo)))
    run = cli("edit", photo, "more sky", "--canvas", "96x96", "--anchor", "bottom", *common(folder),
                "-o", tmp_path / "tall.png")  # fmt: skip
    assert run.returncode == 0, run.stderr
    tall = Image.open(tmp_path / "tall.png")
    assert tall.size == (96, 96) and json.loads(tall.info["flux2"])["init"]["expand"] == [16, 32, 16, 0]
    both = cli("edit", photo, "p", "--canvas", "96x96", "--size", "64x64", *common(folder), "-o", tmp_path / "z.png")
    assert both.returncode == 2 and "--canvas sets the output size" in both.stderr


def test_vae_tile_is_recorded_and_from_decodes_with_it(klein_folder, tmp_path, cli):
    """--vae-tile decodes in tiles (pixels differ from a whole decode near the seams): the PNG records the tile and
    --from uses it again, bit-identical; a bad tile is refused naming the allowed ones."""
    _, folder = klein_folder
    tiled, whole, again = tmp_path / "tiled.png", tmp_path / "whole.png", tmp_path / "again.png"
    assert cli("generate", "a red circle", *common(folder), "--size", "256x192", "--vae-tile", "128", "-o",
               tiled).returncode == 0  # fmt: skip
    assert cli("generate", "a red circle", *common(folder), "--size", "256x192", "-o", whole).returncode == 0
    assert json.loads(Image.open(tiled).info["flux2"])["vae_tile"] == 128
    assert "vae_tile" not in json.loads(Image.open(whole).info["flux2"])
    assert not np.array_equal(np.asarray(Image.open(tiled)), np.asarray(Image.open(whole)))
    assert cli("generate", "--from", tiled, "--weights", folder, "--device", "cpu", "-q", "-o", again).returncode == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(tiled)))
    run = cli("generate", "p", *common(folder), "--vae-tile", "100", "-o", tmp_path / "bad.png")
    assert run.returncode == 2 and "VAE tile 100: give a multiple of 64 pixels from 128 to 2048" in run.stderr


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_every_job_and_output_is_checked_before_any_work_and_nothing_is_lost(tmp_path, cli, monkeypatch):
    """Found trying the CLI as a new user, each before its fix as noted: --overwrite deleted the old file before
    a bad setting failed; a prompts file's bad line 3 was found after lines 1-2 were made; an unwritable -o
    after the denoising; NaN LoRA scales gave a black image; one -o file for many jobs was overwritten by each;
    compare made its first model's images before finding an unknown one; bad lines leaked Python's messages."""
    keep = tmp_path / "keep.png"
    assert cli("generate", "a red circle", "--steps", "1", "-q", "-o", keep).returncode == 0
    before = keep.read_bytes()
    run = cli("generate", "a red circle", "--steps", "999", "-q", "-o", keep, "--overwrite")
    assert run.returncode == 2 and "steps 999 is out of range" in run.stderr and keep.read_bytes() == before
    out = tmp_path / "out"
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c", "guidance": 3}\n')
    run = cli("generate", "--prompts", rows, "--steps", "1", "-q", "-o", out)
    assert run.returncode == 2 and f"{rows} line 4: nano is guidance-distilled" in run.stderr and not _files(out)
    for line, message in (('{"prompt": 5}', '"prompt" must be a non-empty string'),
                          ("null", "not a JSON object"), ('{"prompt": "a",}', "not JSON (Expecting property name"),
                          ('{"prompt": "a", "steps": true}', "steps True is not a whole number"),
                          ('{"prompt": "a", "steps": 2.5}', "steps 2.5 is not a whole number"),
                          ('{"prompt": "a", "seed": "x"}', "seed must be an integer"),
                          ('{"prompt": "a", "refs": ["none.png"]}', "cannot read reference image")):  # fmt: skip
        rows.write_text(line + "\n")
        run = cli("generate", "--prompts", rows, "-q", "-o", out)
        assert run.returncode == 2 and f"{rows} line 1: " in run.stderr and message in run.stderr, (line, run.stderr)
    for target, message in ((keep / "x.png", "cannot write images in"), (tmp_path / "x.jpg", "written as PNG")):
        run = cli("generate", "a red circle", "-q", "-o", target)
        assert run.returncode == 2 and message in run.stderr, run.stderr
    run = cli("generate", "a red circle", "--output-format", "jpeg", "-o", out)  # (was ignored)
    assert run.returncode == 2 and "--output-format: options of the hosted models" in run.stderr
    run = cli("generate", "a gold square", "--model", "nano-base", "--lora", "some.safetensors:nan", "-o", out)
    assert run.returncode == 2 and "LoRA some.safetensors scale nan is out of range -8..8" in run.stderr
    (text := tmp_path / "p.txt").write_text("a red circle\n# a comment\na blue square\n")
    assert cli("generate", "--prompts", text, "--steps", "1", "-q", "-o", tmp_path / "y.png").returncode == 0
    assert [p for p in _files(tmp_path) if p.startswith("y")] == ["y-0.png", "y-1.png"]  # before: y.png twice
    with Image.open(tmp_path / "y-0.png") as im:  # made with other weights: --from used the embedded, silently
        info = PngImagePlugin.PngInfo()
        info.add_text("flux2", json.dumps({**json.loads(im.info["flux2"]), "weights_hash": "0123456789ab"}))
        im.save(tmp_path / "other.png", pnginfo=info)
    run = cli("generate", "--from", tmp_path / "other.png", "-o", tmp_path / "z.png")
    assert run.returncode == 2 and "was made with weights 0123456789ab; these are " in run.stderr, run.stderr
    run = cli("compare", "p", "--models", "nano,nanoo", "-o", tmp_path / "cmp")
    assert run.returncode == 2 and "nanoo" in run.stderr and not _files(tmp_path / "cmp")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # empty: no klein-4b, no key
    monkeypatch.delenv("BFL_API_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    run = cli("compare", "p", "--models", "nano,klein-4b", "-o", tmp_path / "cmp")  # (nano's images were made)
    assert run.returncode == 2 and "klein-4b: no weights given" in run.stderr and not _files(tmp_path / "cmp")
    run = cli("compare", "p", "--models", "nano,pro", "-o", tmp_path / "cmp")
    assert run.returncode == 2 and "pro: no Black Forest Labs API key" in run.stderr and not _files(tmp_path / "cmp")
    run = cli("compare", "p", "--models", "nano,klein-4b", "--backend", "api", "-o", tmp_path / "cmp")
    assert run.returncode == 2 and "nano has no hosted endpoint; hosted: " in run.stderr, run.stderr  # (KeyError)
    run = cli("compare", "p", "--models", "nano", "--guidance", "3", "-o", tmp_path / "cmp")
    assert run.returncode == 2 and "omit --guidance" in run.stderr
    run = cli("compare", "p", "--models", "nano,nano-base", "--guidance-interval", "0.9,0.5", "-o", tmp_path / "cmp")
    assert run.returncode == 2 and "nano-base: guidance interval" in run.stderr and not _files(tmp_path / "cmp")
    for _ in range(2):  # the second time over the first's files
        run = cli("compare", "p", "--models", "nano", "--steps", "1", "-o", tmp_path / "c.png", "--overwrite", "-q")
        assert run.returncode == 0, run.stderr
    assert [p for p in _files(tmp_path) if p.startswith("c")] == ["c-nano-0.png", "c.png"]  # (were c-0, c-1.png)
    assert "--guidance GUIDANCE" not in (usage := cli("compare", "--help").stdout) and "--seed SEED" not in usage
    photo = tmp_path / "c.png"  # (an image made above)
    (text := tmp_path / "p.txt").write_text("a red circle\n")
    monkeypatch.setenv("BFL_API_KEY", "a-key-never-sent")  # (refused before any request)
    for args, message in [  # each was accepted and ignored, or a Python message
        (
            ("generate", "p", "--model", "pro", "--quantize", "int8"),
            "--quantize: options of models run here, not of pro",
        ),
        (("generate", "p", "--model", "pro", "--prompt-upsampling"), "pro (hosted) has no prompt upsampling"),
        (("generate", "--prompts", photo), "is not UTF-8 text: give a .txt"),
        (("generate", "a cat", "--prompts", text), "give a PROMPT or --prompts FILE, not both"),
        (("edit", photo, photo), "the last argument is the prompt, and"),
        (("generate", "p", "--model", "nano-base", "--lora", "x.safetensors:abc"), "scale 'abc' is not a number"),
        (("generate", "p", "--text-encoder", "/nope/q.gguf"), "nano has its own embedded text encoder"),
        (("edit", photo, "more", "--canvas", "200x200"), "by multiples of 16 on each side, e.g. canvas"),
        (("serve", "--model", "klein-4b=/nope/klein"), "--model klein-4b=/nope/klein: no such file or folder"),
    ]:
        run = cli(*args)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)
    run = cli("generate", "--from", tmp_path / "c-nano-0.png", "--model", "pro")  # (its dtype, attention were refused)
    assert run.returncode == 2 and "pro (hosted) has a fixed number of steps" in run.stderr, run.stderr
    from flux2studio.hosted import check_request, endpoint
    from flux2studio.settings import GenerationSettings

    check_request(endpoint("pro"), GenerationSettings("p", prompt_upsampling=False))  # off: what it does anyway
    from flux2studio.loading import EMBEDDED

    run = cli("generate", "p", "--weights", EMBEDDED / "nano.safetensors", "--size", "64x64", "--steps", "1", "-q",
              "-o", tmp_path / "w.png")  # fmt: skip
    assert run.returncode == 0, run.stderr  # nano detected from its shape (was "pass --model nano")
    assert "models of this shape: nano / nano-base" in cli("info", EMBEDDED / "nano.safetensors").stdout
    run = cli("convert", EMBEDDED / "nano.safetensors", tmp_path / "x.bin", "--to", "bfl")  # (made a folder x.bin)
    assert run.returncode == 2 and "--to bfl writes a .safetensors file (or into a folder), not a .bin" in run.stderr
    assert "limit 0 must be a whole number" in cli("eval", "--limit", "0").stderr  # before: all 768 images
    assert "steps 0 is out of range" in cli("eval", "--limit", "1", "--steps", "0").stderr  # (ran nano's 4)
    assert "ignores guidance" in cli("eval", "--limit", "1", "--guidance", "3").stderr  # (dropped, yet reported)
    run = cli("train", "lora", tmp_path, "--model", "nano-base", "--rank", "0", "--out", tmp_path / "r")
    assert run.returncode == 2 and "rank 0 must be a whole number of at least 1" in run.stderr
    assert not (tmp_path / "r").exists()  # before: the model loaded, then PEFT's own message
    run = cli("train", "lora", tmp_path, "--resolution", "4096", "--out", tmp_path / "r")  # (was accepted)
    assert run.returncode == 2 and "resolution 4096 is outside nano-base's sides 64..256" in run.stderr
    run = cli("train", "lora", tmp_path, "--sample-every", "5", "--out", tmp_path / "r")  # (no samples, silently)
    assert run.returncode == 2 and "samples need both --sample-every N and --sample-prompt P" in run.stderr
    (data := tmp_path / "data.jsonl").write_text('{"image": "a.png", "caption": "x"}\n')
    run = cli("train", "lora", data, "--out", tmp_path / "r")  # before: after loading, Python's own message
    assert run.returncode == 2 and f"{data} line 1: no image file" in run.stderr and not (tmp_path / "r").exists()


def test_prompt_files_take_images_batches_are_named_by_seed_and_from_needs_the_references(tmp_path, cli):
    """A .jsonl line's "refs", "image" and "mask" (before: refs silently dropped, image an error); a batch's
    files named by each image's seed (before: nano-5-1.png was seed 6); --from on an image made with references
    asks for them, checks them by hash and then remakes it bit for bit (before: it dropped them, exit 0)."""
    Image.new("RGB", (96, 64), (200, 40, 40)).save(tmp_path / "r.png")
    Image.new("RGB", (128, 128), (40, 40, 200)).save(tmp_path / "start.png")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "other.png")
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "like this", "refs": ["r.png"]}\n{"prompt": "bluer", "image": "start.png", '
                    '"strength": 0.5}\n')  # fmt: skip
    out = tmp_path / "out"
    run = cli("generate", "--prompts", rows, "--steps", "1", "-q", "-o", out, "--seed", "5", "--num", "2")
    assert run.returncode == 0, run.stderr
    assert _files(out) == ["nano-5-1.png", "nano-5.png", "nano-6-1.png", "nano-6.png"]  # two jobs, seeds 5, 6
    first = out / "nano-5.png"
    meta = json.loads(Image.open(first).info["flux2"])
    assert len(meta["refs"]) == 1 and (meta["width"], meta["height"]) == (96, 64)  # the reference's size
    assert json.loads(Image.open(out / "nano-5-1.png").info["flux2"])["init"]["strength"] == 0.5
    run = cli("generate", "--from", first, "-q", "-o", tmp_path / "again.png")
    assert run.returncode == 2 and "made from 1 reference image(s)" in run.stderr and "--ref" in run.stderr
    run = cli("generate", "--from", first, "--ref", tmp_path / "other.png", "-q", "-o", tmp_path / "again.png")
    assert run.returncode == 2 and "is not reference 0" in run.stderr
    run = cli("generate", "--from", first, "--ref", tmp_path / "r.png", "-q", "-o", tmp_path / "again.png")
    assert run.returncode == 0, run.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(first)))


def test_from_checks_a_hosted_images_references_as_given(tmp_path):
    """A hosted model records its references' hashes as given, not as the local pipeline prepares them (the
    check compared prepared hashes: the right file was refused)."""
    from flux2studio.cli import recorded_refs
    from flux2studio.images import image_hash
    from flux2studio.images import open_reference as reference

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (700, 1000, 3), dtype=np.uint8)).save(tmp_path / "ref.png")
    recorded = [image_hash(reference(tmp_path / "ref.png"))]
    assert len(recorded_refs(recorded, [str(tmp_path / "ref.png")], "h.png", prepared=False)) == 1
    with pytest.raises(ValueError, match="is not reference 0"):  # the local pipeline's hashes differ: cropped
        recorded_refs(recorded, [str(tmp_path / "ref.png")], "h.png")


def test_from_checks_the_loras_an_image_was_made_with(tmp_path):
    """Before any model is loaded: the same LoRA files (by hash) and scales, or a clear error."""
    from flux2studio.checkpoints import weights_hash
    from flux2studio.cli import check_recorded_loras

    (style := tmp_path / "style.safetensors").write_bytes(b"a LoRA")
    (other := tmp_path / "other.safetensors").write_bytes(b"another LoRA")
    recorded = [{"file": "style.safetensors", "hash": weights_hash([style]), "scale": 0.5}]
    check_recorded_loras([f"{style}:0.5"], recorded, "x.png")
    for given in ([], [f"{style}:0.8"], [f"{other}:0.5"], [f"{tmp_path / 'missing.safetensors'}:0.5"]):
        with pytest.raises(ValueError, match=r"made with LoRA style.safetensors:0.5 \(hash "):
            check_recorded_loras(given, recorded, "x.png")
    with pytest.raises(ValueError, match="made without LoRAs: omit --lora"):
        check_recorded_loras([str(style)], [], "x.png")
