"""Thin command line: parse, call the library, print. `flux2 --help` lists the commands."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING

from . import variants
from .kernels import ATTENTION_MODES
from .precision import DTYPE_CHOICES, DTYPE_NAMES, QUANTIZE_CHOICES
from .settings import GenerationSettings
from .variants import ANCHORS, ASPECTS, VARIANTS, Variant, get_variant

if TYPE_CHECKING:
    from pathlib import Path

    from PIL import Image


@cache
def transformer_params(variant_id: str) -> int | None:
    """Exact transformer parameter count, from the model built on the meta device (no memory)."""
    import torch

    from .model.transformer import Flux2Transformer

    cfg = VARIANTS[variant_id].transformer
    if cfg is None:
        return None
    with torch.device("meta"):
        model = Flux2Transformer(cfg)
    return sum(p.numel() for p in model.parameters())


def variant_row(v: Variant) -> dict:
    return {
        "id": v.id,
        "description": v.description,
        "params": transformer_params(v.id),
        "steps": None if v.hosted else v.steps,
        "guidance": None if v.hosted else v.guidance,
        "guidance_mode": None if v.hosted else v.guidance_mode,
        "guidance_interval": v.cfg_interval,
        "license": v.license,
        "hosted": v.hosted,
        "text_encoder": v.text_encoder.model if v.text_encoder else None,
        "default_size": list(v.default_size) if not v.hosted else None,
        "max_refs": v.max_refs,
        "files": list(v.files),
        "repo": v.repo,
        "repo_4bit": v.repo_4bit,
        "api": api_row(v.id),
    }


def api_row(model_id: str) -> dict | None:
    """The hosted endpoint of a model (all hosted ones, and klein via --backend api) with its price."""
    from .hosted import ENDPOINTS, price

    e = ENDPOINTS.get(model_id)
    return None if e is None else {"path": e.path, "usd_1mp": price(e, 1024, 1024)}


def cmd_models(args: argparse.Namespace) -> int:
    from .hosted import key_present
    from .loading import find_local

    keyed = key_present()
    here = here_dtype()
    rows = [variant_row(v) | {"present": keyed if v.hosted else find_local(v) is not None,
                              "compute_dtype": None if v.hosted else here.name} for v in VARIANTS.values()]  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'id':<14} {'params':>15} {'steps':>5} {'guidance':>8} {'mode':<9} {'weights':<8} license")
    for r in rows:
        params = f"{r['params']:,}" if r["params"] else "hosted"
        steps = r["steps"] if r["steps"] is not None else "-"
        guidance = r["guidance"] if r["guidance"] is not None else "-"
        mode = r["guidance_mode"] or "-"
        present = ("key set" if keyed else "no key") if r["hosted"] else ("present" if r["present"] else "-")
        print(f"{r['id']:<14} {params:>15} {steps:>5} {guidance:>8} {mode:<9} {present:<8} {r['license']}")
    print(f"\nlocal models compute here in {here.name} ({here.reason}); --dtype overrides")
    return 0


def here_dtype():
    """What `--dtype auto` picks on this machine's default device (precision.compute_dtype)."""
    from .loading import default_device
    from .precision import compute_dtype

    return compute_dtype("auto", default_device())


def parse_interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"guidance interval {text!r} is not LOW,HIGH, e.g. 0,0.9") from None
    return lo, hi


def parse_expand(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expansion {text!r} is not LEFT,TOP,RIGHT,BOTTOM pixels, e.g. 0,0,256,0")
    if not any(values):
        raise argparse.ArgumentTypeError(f"expansion {text!r} adds nothing: give pixels to add on some side")
    return values  # type: ignore[return-value]


def parse_seeds(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3] (compare's and eval's --seeds)."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text!r} is not a comma-separated list of integers") from None


def disk_bytes(text: str) -> int:
    """'20GB', '512MB', '1.5TB', '100000' -> bytes (decimal units, as disks are sold)."""
    from .device_streaming import parse_bytes

    try:
        return parse_bytes(text, base=1000)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_size(text: str) -> tuple[int, int]:
    try:
        return variants.parse_size(text.strip().lower())  # on the command line, " 1024X768" is meant too
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def load_pipe(model: str | None, args: argparse.Namespace):
    from huggingface_hub.utils import disable_progress_bars

    from .loading import load

    disable_progress_bars()  # our own progress bar is the one to read; transformers takes this when imported
    if "transformers" in sys.modules:  # (it was imported before: tell it too)
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    api = {"location": args.api, "safety_tolerance": args.safety_tolerance, "output_format": args.output_format}
    api = {k: v for k, v in api.items() if v is not None}  # (the hosted client's defaults otherwise)
    pipe = load(model, weights=args.weights, device=args.device, dtype=args.dtype, vae=getattr(args, "vae", None),
                text_encoder=getattr(args, "text_encoder", None), backend=args.backend, api=api,
                attention=getattr(args, "attention", None) or "auto",
                quantize=getattr(args, "quantize", None), vram_budget=getattr(args, "vram", None),
                compile=getattr(args, "compile", False), vae_tile=getattr(args, "vae_tile", None))  # fmt: skip
    if getattr(args, "lora", None):
        pipe.set_loras([parse_lora_arg(a) for a in args.lora])
    if getattr(args, "dtype_reason", None) and args.dtype is not None:
        pipe.dtype_reason = args.dtype_reason
    return pipe


def check_hosted_flags(model: str | None, args: argparse.Namespace) -> None:
    """The hosted API's options given for a model that runs here are an error (they would change nothing)."""
    hosted = model is not None and (args.backend == "api" or get_variant(model).hosted)
    given = [flag for flag, value in (("--api", args.api), ("--safety-tolerance", args.safety_tolerance),
                                      ("--output-format", args.output_format)) if value is not None]  # fmt: skip
    if given and not hosted:
        raise ValueError(f"{', '.join(given)}: options of the hosted models (pro, max, flex, kontext-*; klein with "
                         f"--backend api), not of {model or 'local weights'} run here")  # fmt: skip
    local = [flag for flag, name in LOCAL_FLAGS.items() if getattr(args, name, None) not in (None, False)]
    if local and hosted:
        raise ValueError(f"{', '.join(local)}: options of models run here, not of {model} (run by Black Forest "
                         "Labs' API)")  # fmt: skip


# options of the models run here (their flag: its argparse name); given for a hosted model, they are an error
LOCAL_FLAGS = {"--quantize": "quantize", "--dtype": "dtype", "--device": "device", "--vram": "vram",
               "--vae-tile": "vae_tile", "--compile": "compile", "--attention": "attention", "--vae": "vae",
               "--text-encoder": "text_encoder"}  # fmt: skip


def parse_lora_arg(text: str) -> tuple[str, float]:
    """FILE or FILE:SCALE (scale defaults to 1.0; its range is checked where LoRAs are set)."""
    from pathlib import Path

    path, _, scale = text.rpartition(":")
    if path and scale and not Path(text).exists():
        try:
            return path, float(scale)
        except ValueError:
            if Path(path).exists() or Path(path).suffix.lower() in (".safetensors", ".gguf"):
                raise ValueError(f"--lora {text}: scale {scale!r} is not a number (FILE:SCALE, e.g. :0.8)") from None
    return text, 1.0


def settings_from_args(args: argparse.Namespace) -> dict:
    out = {"seed": args.seed, "num_images": args.num}
    for key, flag in (("size", "size"), ("aspect", "aspect"), ("steps", "steps"), ("guidance", "guidance"),
                      ("guidance_interval", "guidance_interval"), ("negative_prompt", "negative"),
                      ("prompt_upsampling", "prompt_upsampling")):  # fmt: skip
        if getattr(args, flag, None) is not None:
            out[key] = getattr(args, flag)
    return out


def jobs_from_file(path: str, base: dict) -> list[tuple[str, GenerationSettings]]:
    """.txt: one prompt a line (blank lines and lines starting with # skipped); .jsonl: one object a line with
    "prompt" and any of the settings (image files in "refs", "image", "mask": relative to the file's folder).
    Each job with where it was read ("FILE line N"), for its errors."""
    from pathlib import Path

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--prompts {path} is not UTF-8 text: give a .txt (a prompt a line) or a .jsonl") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not path.endswith(".jsonl"):
        return [(f"{path} line {n}", GenerationSettings.of(line.strip(), **base))
                for n, line in lines if not line.lstrip().startswith("#")]  # fmt: skip
    jobs = []
    for n, line in lines:
        try:
            jobs.append((f"{path} line {n}", job_from_row(line, base, Path(path).parent)))
        except ValueError as e:
            raise ValueError(f"{path} line {n}: {e}") from None
    return jobs


def job_from_row(line: str, base: dict, folder: Path) -> GenerationSettings:
    """One line of a .jsonl file: the CLI's names (negative, num, "WxH" sizes, "lo,hi" intervals) and the
    settings' own, width and height as the metadata writes them."""
    from .images import open_image, open_reference

    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"not a JSON object: {line.strip()[:40]!r}")
    prompt = row.pop("prompt", None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f'"prompt" must be a non-empty string, got {prompt!r}'[:120])
    names = {"negative": "negative_prompt", "num": "num_images"}
    if both := [k for k in names if k in row and names[k] in row]:
        raise ValueError(f'give "{both[0]}" or "{names[both[0]]}", not both')
    extra = {names.get(k, k): v for k, v in row.items()}
    if ("width" in extra) != ("height" in extra):
        raise ValueError('give "width" and "height" together (or "size": "WxH")')
    if "width" in extra:
        extra["size"] = (extra.pop("width"), extra.pop("height"))
    if isinstance(extra.get("size"), str):
        extra["size"] = parse_size(extra["size"])
    if isinstance(extra.get("guidance_interval"), str):  # "0,0.9" as on the command line
        extra["guidance_interval"] = parse_interval(extra["guidance_interval"])

    def image(value, what: str):
        if not isinstance(value, str):
            raise ValueError(f"{what} must be an image file's path, got {value!r}"[:120])
        return open_image(folder / value, what)

    for key, what in (("image", "start image"), ("mask", "mask")):
        if extra.get(key) is not None:
            extra[key] = image(extra[key], what)
    if "refs" in extra:
        if not (isinstance(extra["refs"], list) and all(isinstance(r, str) for r in extra["refs"])):
            raise ValueError(f'"refs" must be a list of image files, got {extra["refs"]!r}'[:120])
        extra["refs"] = [open_reference(folder / r) for r in extra["refs"]]
    return GenerationSettings.of(prompt, **{**base, **extra})


def job_from_png(path: str, args: argparse.Namespace) -> tuple[dict, GenerationSettings]:
    """Settings recorded in a PNG made by this tool; flags given on the command line override them. References
    and LoRAs must be the recorded ones (by hash), as start images and masks must."""
    from .images import read_metadata

    meta = read_metadata(path)
    missing = [k for k in ("prompt", "model", "seed", "steps", "width", "height") if k not in meta]
    if missing:
        raise ValueError(f"{path}: its flux2 metadata lacks {', '.join(missing)} (not written by flux2studio)")
    settings = {"seed": meta["seed"], "steps": meta["steps"], "size": (meta["width"], meta["height"]), "num_images": 1}
    target = VARIANTS.get(args.model or meta["model"])  # the model that will run, which `--model` may change
    guidance = meta.get("guidance")
    if meta.get("negative_prompt") and guidance is not None and guidance > 1.0:  # (at 1 it had no effect)
        settings["negative_prompt"] = meta["negative_prompt"]
    if guidance is not None and (guidance != 1.0 or (target is not None and target.uses_cfg)):
        settings["guidance"] = guidance
        if target and target.cfg_interval:
            settings["guidance_interval"] = tuple(meta.get("guidance_interval", (0.0, 1.0)))  # older: every step
    if target and target.upsampler:  # planned or as written; older images: as written
        settings["prompt_upsampling"] = meta.get("prompt_upsampling", False)
    if "init" in meta:  # an edit: the same start image and mask, checked against the recorded hashes
        settings.update(recorded_edit(meta["init"], args, path))
    elif getattr(args, "init", None):
        raise ValueError(f"{path} was not made from a start image: omit --init")
    settings["refs"] = recorded_refs(meta.get("refs") or [], args.ref, path, prepared=not meta.get("hosted"))
    check_recorded_loras(args.lora, meta.get("loras") or [], path)
    given = {k: v for k, v in settings_from_args(args).items() if k not in ("seed", "num_images")}
    if args.seed_given:
        given["seed"] = args.seed
    if not meta.get("hosted") and not (args.backend == "api" or (target is not None and target.hosted)):
        replay_compute(meta, args, path)  # how a local model computed it, for a local model to run
    return meta, GenerationSettings.of(args.prompt or meta["prompt"], **{**settings, **given})


def replay_compute(meta: dict, args: argparse.Namespace, source: str) -> None:
    """The recorded dtype, quantization, VAE tiles and attention, where the command line gives none: each
    changes the pixels."""
    if args.dtype is None:  # same dtype as recorded, or the image will differ
        args.dtype = next((k for k, v in DTYPE_NAMES.items() if v == meta.get("dtype")), None)
        args.dtype_reason = f"as recorded in {os.path.basename(source)}"  # (the new image's metadata said "given")
    if getattr(args, "quantize", None) is None:
        args.quantize = meta.get("quantize")
    if getattr(args, "vae_tile", None) is None:  # tiles change the pixels near their seams
        args.vae_tile = meta.get("vae_tile")
    if getattr(args, "attention", None) is None:  # bf16 attention kernels round differently
        args.attention = meta.get("attention", "sdpa")  # images from before the kernel: PyTorch's


def recorded_refs(hashes: list[str], given: list[str], path: str, prepared: bool = True) -> list[Image.Image]:
    """The --ref files, which must be the references `path` was made from, in order (hashes of the images as
    the local pipeline prepares them, or as given: `prepared` False, a hosted model's)."""
    from .images import image_hash, open_reference, prepare_reference

    if not hashes and given:
        raise ValueError(f"{path} was made without reference images: omit --ref")
    if len(given) != len(hashes):
        raise ValueError(f"{path} was made from {len(hashes)} reference image(s) (hashes {', '.join(hashes)}): pass "
                         f"them with --ref, in order ({len(given)} given)")  # fmt: skip
    refs = [open_reference(g) for g in given]
    for i, (ref, file, recorded) in enumerate(zip(refs, given, hashes, strict=True)):
        if (found := image_hash(prepare_reference(ref, i) if prepared else ref)) != recorded:
            raise ValueError(f"--ref {file} is not reference {i} {path} was made from (hash {found}, recorded "
                             f"{recorded})")  # fmt: skip
    return refs


def check_recorded_loras(given: list[str], recorded: list[dict], path: str) -> None:
    """The `--lora` files and scales must be those `path` was made with (files by hash), checked before any
    model is loaded."""
    from pathlib import Path

    from .checkpoints import weights_hash

    have = []
    for text in given:
        file, scale = parse_lora_arg(text)
        have.append((weights_hash([Path(file)]) if Path(file).is_file() else None, scale))
    if have == [(r.get("hash"), r.get("scale")) for r in recorded]:
        return
    if not recorded:
        raise ValueError(f"{path} was made without LoRAs: omit --lora")
    wanted = ", ".join(f"{r.get('file')}:{r.get('scale'):g} (hash {r.get('hash')})" for r in recorded)
    raise ValueError(f"{path} was made with LoRA {wanted}: pass the same with --lora FILE:SCALE")


ARTICLE = {"image": "an", "mask": "a"}


def recorded_edit(init: dict, args: argparse.Namespace, path: str) -> dict:
    """The edit settings a PNG records, with the start image and mask the command names (hashes must match)."""
    from .images import image_hash, open_image

    files = {"image": (getattr(args, "init", None), "--init"), "mask": (getattr(args, "mask", None), "--mask")}
    settings = {"strength": init["strength"] if args.strength is None else args.strength,
                "mask_blur": args.mask_blur or (init.get("mask_blur", 0) if init.get("mask") else 0)}  # fmt: skip
    if init.get("expand"):
        settings["expand"], settings["size"] = tuple(init["expand"]), None
    for key, (given, flag) in files.items():
        if init.get(key) is None:
            if given:
                raise ValueError(f"{path} was made without {ARTICLE[key]} {key}: omit {flag}")
            continue
        if not given:
            raise ValueError(f"{path} was made from {ARTICLE[key]} {key} with hash {init[key]}: pass that file with "
                             f"{flag}")  # fmt: skip
        opened = open_image(given, key)
        if (found := image_hash(opened)) != init[key]:
            raise ValueError(f"{flag} {given} is not the {key} {path} was made from (hash {found}, "
                             f"recorded {init[key]})")  # fmt: skip
        settings[key] = opened
    return settings


def edit_settings(args: argparse.Namespace, image) -> dict:
    """The start image with the editing flags: mask, strength, blur, and an expansion (or canvas + anchor)."""
    from .editing import expansion, start_size, upright
    from .images import open_image

    out = {"image": image}
    if args.mask_blur and not args.mask:
        raise ValueError("--mask-blur softens a mask's edges: give --mask too")
    if args.anchor and not args.canvas:
        raise ValueError("--anchor places the image on --canvas: give --canvas WxH too")
    if args.mask:
        out["mask"] = open_image(args.mask, "mask")
    if args.strength is not None:
        out["strength"] = args.strength
    if args.mask_blur:
        out["mask_blur"] = args.mask_blur
    if args.expand:
        out["expand"] = args.expand
    elif args.canvas:
        if args.size or args.aspect:
            raise ValueError("--canvas sets the output size (the image plus what it grows by): omit --size/--aspect")
        out["expand"] = expansion(start_size(upright(image)), args.canvas, args.anchor or "center")
        if not any(out["expand"]):
            raise ValueError(f"--canvas {args.canvas[0]}x{args.canvas[1]} is the image's own size: it adds nothing")
    return out


def editing_flags(args: argparse.Namespace) -> list[str]:
    named = {"--mask": args.mask, "--strength": args.strength, "--mask-blur": args.mask_blur or None,
             "--expand": args.expand, "--canvas": args.canvas, "--anchor": args.anchor}  # fmt: skip
    return [flag for flag, value in named.items() if value is not None]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")  # -o names none of these


def output_paths(out: str | None, jobs: list[list[str]], overwrite: bool) -> list[list]:
    """Where each job's images go (`jobs`: a name stem for each image), decided before any work: `-o file.png`
    (numbered file-0.png, file-1.png, ... when there is more than one image in all) or `-o folder/` (free names
    `stem.png`, else `stem-1.png`, ...); a taken file is an error unless `overwrite`; the folder must be
    writable."""
    from pathlib import Path

    target = Path(out or "outputs")
    if target.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"-o {target}: images are written as PNG (their settings ride in its text chunks): "
                         "name a .png file or a folder")  # fmt: skip
    if target.suffix.lower() != ".png":  # a folder: free names inside it
        writable_folder(target)
        plan, chosen = [], set()
        for stems in jobs:
            paths = []
            for stem in stems:
                k = 0
                while (candidate := target / (f"{stem}.png" if k == 0 else f"{stem}-{k}.png")).exists() or (
                    candidate in chosen
                ):
                    k += 1
                paths.append(candidate)
                chosen.add(candidate)
            plan.append(paths)
        return plan
    total = sum(map(len, jobs))
    names = [target] if total == 1 else [target.with_name(f"{target.stem}-{i}{target.suffix}") for i in range(total)]
    claim(names, overwrite)
    plan, start = [], 0
    for stems in jobs:
        plan.append(names[start : start + len(stems)])
        start += len(stems)
    return plan


def claim(paths: list, overwrite: bool) -> None:
    """Files about to be written, checked first: their folder writable, none existing unless `overwrite`."""
    writable_folder(paths[0].parent)
    taken = [str(p) for p in paths if p.exists()]
    if taken and not overwrite:
        raise FileExistsError(f"{', '.join(taken)} {'exist' if len(taken) > 1 else 'exists'}: choose another -o, a "
                              "folder, or pass --overwrite")  # fmt: skip


def writable_folder(folder: Path) -> None:
    """Make `folder` (and its parents) and check that a file can be written in it: a clear error now, not
    after the denoising."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".flux2-write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write images in {folder}: {e.strerror or e}") from None


def run_jobs(pipe, jobs: list[tuple[str, GenerationSettings]], args: argparse.Namespace) -> int:
    """Check every job, plan every output path, then generate and save each (`jobs`: where each was read, for
    its errors, and its settings)."""
    import time

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .images import save_png

    stems = []  # each image named by its seed
    for where, job in jobs:
        try:
            stems.append([f"{pipe.variant.id}-{seed}" for seed in pipe.check(job)])
        except ValueError as e:
            raise ValueError(f"{where}: {e}" if where else str(e)) from None
    plan = output_paths(args.out, stems, args.overwrite)
    for (_, job), paths in zip(jobs, plan, strict=True):
        bar = tqdm(total=None, desc="denoise", unit="step", leave=False, disable=args.quiet)

        def progress(i: int, total: int, _x, bar=bar) -> None:
            bar.total = total
            bar.update(1)

        started = time.perf_counter()
        try:
            notes = logging.getLogger("flux2studio")
            with contextlib.nullcontext() if args.quiet else logging_redirect_tqdm(loggers=[notes]):  # above the bar
                images = list(enumerate(pipe(job, callback=progress)))
        except Exception as e:  # a hosted batch may fail part-way: save what was made, then report
            bar.close()
            for i, image in getattr(e, "images", []):
                save_png(image, paths[i], overwrite=args.overwrite)
                print(f"{paths[i]}  seed {json.loads(image.info['flux2'])['seed']}  (made before the error)")
            raise
        seconds = time.perf_counter() - started
        bar.close()
        for i, image in images:
            save_png(image, paths[i], overwrite=args.overwrite)
            meta = json.loads(image.info["flux2"])
            print(f"{paths[i]}  seed {meta['seed']}  {image.width}x{image.height}  {pipe.variant.id}  {seconds:.2f}s")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .images import open_reference

    model = args.model
    if args.from_png:
        if args.prompts:
            raise ValueError("--from remakes one image: omit --prompts")
        recorded, job = job_from_png(args.from_png, args)
        model = model or recorded["model"]
        jobs = [("", job)]
    else:
        if args.init:
            from .images import open_image

            edit = edit_settings(args, open_image(args.init, "start image"))
        elif flags := editing_flags(args):
            verb = "edit" if len(flags) > 1 else "edits"
            raise ValueError(f"{', '.join(flags)} {verb} a start image: give it with --init IMAGE")
        else:
            edit = {}
        base = {**settings_from_args(args), **edit, "refs": [open_reference(r) for r in args.ref]}
        if args.prompts:
            if args.prompt:
                raise ValueError(f"give a PROMPT or --prompts FILE, not both ({args.prompt!r} and {args.prompts})")
            jobs = jobs_from_file(args.prompts, base)
            if not jobs:
                raise ValueError(f"{args.prompts} holds no prompt")
        elif args.prompt and args.prompt.strip():
            jobs = [("", GenerationSettings.of(args.prompt, **base))]
        else:
            raise ValueError("give a PROMPT, --prompts FILE or --from IMAGE.png")
    model = model or (None if args.weights else "nano")
    check_hosted_flags(model, args)
    pipe = load_pipe(model, args)
    if args.from_png:
        check_recorded_weights(pipe.weights_hash, recorded, args)
    return run_jobs(pipe, jobs, args)


def check_recorded_weights(here: str, meta: dict, args: argparse.Namespace) -> None:
    """--from with other weights than the image's (a converted or fine-tuned file, another download) would make
    another image: an error, unless --weights or --model was given to change them (then a note)."""
    made = meta.get("weights_hash")
    if not made or not here or made == here:
        return
    message = f"{args.from_png} was made with weights {made}; these are {here}"
    if args.weights or args.model:
        print(f"note: {message}: the image will differ", file=sys.stderr)
        return
    raise ValueError(f"{message}: pass the --weights (and --model) it was made with, for the same image")


def cmd_edit(args: argparse.Namespace) -> int:
    """IMAGE [IMAGE...] PROMPT: references; with a mask, strength or expansion the first image is the one
    edited (inpainting, image-to-image, outpainting) and the others are references."""
    from pathlib import Path

    from .images import open_reference

    *images, prompt = args.inputs
    if not images:
        raise ValueError("give at least one IMAGE before the PROMPT")
    if Path(prompt).suffix.lower() in (".png", *IMAGE_SUFFIXES) and Path(prompt).is_file():
        raise ValueError(f"the last argument is the prompt, and {prompt!r} is an image file: flux2 edit IMAGE... "
                         "PROMPT")  # fmt: skip
    if not Path(images[0]).exists() and Path(prompt).is_file():
        raise ValueError(f"cannot read image {images[0]!r}: the images come first, the prompt last "
                         "(flux2 edit IMAGE... PROMPT)")  # fmt: skip
    settings = settings_from_args(args)
    if editing_flags(args):
        from .images import open_image

        settings.update(edit_settings(args, open_image(images[0], "image")))
        images = images[1:]
    settings["refs"] = [open_reference(i) for i in images]
    model = args.model or (None if args.weights else "nano")
    check_hosted_flags(model, args)
    return run_jobs(load_pipe(model, args), [("", GenerationSettings.of(prompt, **settings))], args)


# flags of generate that compare has no use for (each model runs at its own guidance): given, they are an error
COMPARE_REFUSES = {"--model": lambda a: a.model is not None, "--seed": lambda a: a.seed_given,
                   "--num": lambda a: a.num != 1, "--guidance": lambda a: a.guidance is not None}  # fmt: skip


def compare_settings(model: str, settings: dict, args: argparse.Namespace) -> dict:
    """The shared settings as `model` takes them: a fixed-step hosted model its own steps, a model without CFG
    no negative prompt or interval, a model with no upsampler of its own the prompt as written."""
    v = get_variant(model)
    kw = dict(settings)
    if v.hosted or args.backend == "api":
        from .hosted import endpoint

        e = endpoint(model)
        if e.steps is None:
            kw.pop("steps", None)
        if not e.prompt_upsampling:
            kw.pop("prompt_upsampling", None)
    if not v.uses_cfg:
        kw.pop("negative_prompt", None)
        kw.pop("guidance_interval", None)
    if not (v.upsampler or v.hosted):
        kw.pop("prompt_upsampling", None)
    return kw


def check_compare(models: list[str], prompt: str, seeds: list[int], settings: dict, args) -> None:
    """Every model's settings checked (its own rules), and its weights or the API key found, before the first
    model runs."""
    from .hosted import HostedError, check_request, endpoint, required_key
    from .loading import cached_weights
    from .pipeline import build_request

    for model in models:
        kw = {**compare_settings(model, settings, args), "seeds": seeds, "num_images": len(seeds)}
        try:
            if get_variant(model).hosted or args.backend == "api":
                check_request(endpoint(model), GenerationSettings.of(prompt, **kw))
                required_key()
            else:
                build_request(get_variant(model), prompt, **kw)
                if args.weights is None and model not in variants.EMBEDDED_IDS:
                    cached_weights(get_variant(model))
        except (ValueError, OSError, HostedError) as e:
            raise ValueError(f"{model}: {e}") from None


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .images import grid, save_png

    for flag, given in COMPARE_REFUSES.items():
        if given(args):
            raise ValueError(f"compare takes models with --models, seeds with --seeds and runs each model at its own "
                             f"guidance: omit {flag}")  # fmt: skip
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise ValueError(f"--models {args.models!r} names no model: e.g. --models klein-4b,klein-base-4b")
    seeds = parse_seeds(args.seeds)
    settings = {k: v for k, v in settings_from_args(args).items() if k not in ("seed", "num_images", "guidance")}
    check_compare(models, args.prompt, seeds, settings, args)  # (an unknown id, too) before the first model runs
    out = Path(args.out or "compare")
    if out.suffix.lower() == ".png":  # the sheet there, each image beside it, named by model and seed
        plan = [[out.with_name(f"{out.stem}-{m}-{seed}.png") for seed in seeds] for m in models] + [[out]]
        claim([path for paths in plan for path in paths], args.overwrite)
    else:
        plan = output_paths(str(out), [[f"{m}-{seed}" for seed in seeds] for m in models] + [["grid"]], args.overwrite)
    cells, labels = [], []
    for model, paths in zip(models, plan, strict=False):  # one model in memory at a time
        pipe = load_pipe(model, args)
        images = pipe(args.prompt, seeds=seeds, num_images=len(seeds), **compare_settings(model, settings, args))
        for seed, image, path in zip(seeds, images, paths, strict=True):
            save_png(image, path, overwrite=args.overwrite)
            cells.append(image)
            labels.append(f"{model}  seed {seed}")
        del pipe
    sheet = grid(cells, labels, columns=len(seeds))
    save_png(sheet, plan[-1][0], overwrite=args.overwrite)
    print(f"{plan[-1][0]}  {len(models)} models x {len(seeds)} seeds  ({', '.join(models)})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .nano.train import TrainConfig, run

    extra = dict(kv.split("=", 1) for kv in args.set)
    cfg = TrainConfig(stage=args.stage, out=args.out, steps=args.steps, batch=args.batch, lr=args.lr,
                      warmup=args.warmup, seed=args.seed, ckpt_every=args.ckpt_every, ema=args.ema, extra=extra,
                      stop_after=args.stop_after, device=args.device, workers=args.workers,
                      max_minutes=args.max_minutes)  # fmt: skip
    run(cfg)
    return 0


def cmd_train_lora(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .loading import load
    from .train.lora import (
        LoraTrainConfig,
        check_rank,
        check_resolution,
        check_trainable,
        import_peft,
        read_dataset,
        train_lora,
    )

    variant = get_variant(args.model)
    check_trainable(variant)  # before loading it, as everything below
    check_rank(variant, args.rank)
    if args.resolution is not None:  # (none given: a resumed run's, or 512 within the model's sides: train_lora)
        check_resolution(variant, args.resolution)
    cfg = LoraTrainConfig(
        data=args.data, out=args.out, rank=args.rank, alpha=args.alpha, lr=args.lr, steps=args.steps,
        batch=args.batch, resolution=args.resolution, caption_dropout=args.caption_dropout,
        grad_checkpointing=args.grad_checkpointing, mode=args.mode, sample_every=args.sample_every,
        sample_prompts=tuple(args.sample_prompt), sample_steps=args.sample_steps, ckpt_every=args.ckpt_every,
        seed=args.seed, save_kohya=args.kohya,
    )  # fmt: skip
    samples = read_dataset(cfg.data, cfg.mode)  # its errors (a missing image, a bad line) before the model loads
    import_peft()  # (an optional part: said before loading)
    pipe = load(args.model, weights=args.weights, device=args.device, dtype=args.dtype)
    bar = tqdm(total=cfg.steps, desc=f"lora {args.model}", dynamic_ncols=True)

    def log(row: dict) -> None:
        bar.n = row["step"]
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        bar.refresh()

    path = train_lora(pipe, cfg, log, samples)
    bar.close()
    print(f"{path}  rank {cfg.rank}  {cfg.steps} steps")
    return 0


def serve_extra() -> None:
    """uvicorn and fastapi, the `serve` extra, there, or an error saying how to install it."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"flux2 serve needs {e.name}: pip install 'flux2studio[serve]'") from None


def check_served(weights: dict[str, str | None], lora_dir: str | None) -> None:
    """Every served model's weights found and readable (their headers), and the LoRA folder, before the server
    starts (the first job failed, while /health said ok)."""
    from pathlib import Path

    from .conversion import describe
    from .loading import cached_weights, file_transformer

    for model, path in weights.items():
        variant = get_variant(model)
        if path not in (None, "api"):
            if not Path(path).exists():
                raise FileNotFoundError(f"--model {model}={path}: no such file or folder")
            try:
                file_transformer(Path(path)) if Path(path).is_file() else describe(path)
            except (ValueError, OSError, KeyError) as e:
                raise ValueError(f"--model {model}={path}: {str(e).splitlines()[0]}") from None
        if path is None and not variant.hosted and model not in variants.EMBEDDED_IDS:
            cached_weights(variant)
    if lora_dir is not None and not Path(lora_dir).is_dir():
        raise FileNotFoundError(f"--lora-dir {lora_dir}: no such folder")


def check_port(host: str, port: int) -> None:
    """`host:port` can be listened on now (as uvicorn binds, SO_REUSEADDR: a restart's TIME_WAIT is no obstacle)."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # as asyncio binds "::": IPv6 only (an IPv4 listener elsewhere is no obstacle)
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            why = ": another server (flux2 serve?) has it; stop it or choose another --port"
            raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e})"
                          f"{why if e.errno == errno.EADDRINUSE else ''}") from None  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress
    import os

    token = args.token or os.environ.get("FLUX2_TOKEN")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:  # a name: only "localhost" is taken as loopback without a token
        loopback = args.host.lower() == "localhost"
    wildcard = args.host in ("0.0.0.0", "::")  # any address: Host names to serve come from --allowed-host
    hosts = [*(args.allowed_host or []), *([] if wildcard else [args.host])]
    if not loopback and not token:
        raise ValueError(f"refusing to bind {args.host} without an API token: pass --token or set FLUX2_TOKEN")
    if args.ray:
        from .serve.ray_app import ScaleConfig, run

        cfg = ScaleConfig.read(
            args.config,
            models=args.model,
            db=args.db,
            data=args.data,
            files=args.files,
            token=token,
            device=args.device,
            dtype=args.dtype,
            quantize=args.quantize,
            vram=args.vram,
            compile=args.compile or None,  # (None: the config file's)
            vae_tile=args.vae_tile,
        )
        cfg.allowed_hosts = [*cfg.allowed_hosts, *hosts]
        store = "PostgreSQL" if cfg.db else "SQLite"
        print(f"Flux2 Studio on Ray Serve: http://{args.host}:{args.port}  (models: {', '.join(cfg.models)}, "
              f"store: {store}, replicas {cfg.min_replicas}..{cfg.max_replicas})")  # fmt: skip
        run(cfg, args.host, args.port, address=args.address)
        return 0
    serve_extra()  # (its install hint before anything starts)

    from .loading import load
    from .serve.app import create_app

    served = args.model or list(variants.EMBEDDED_IDS)
    weights = dict(m.split("=", 1) if "=" in m else (m, None) for m in served)
    check_served(weights, args.lora_dir)
    check_port(args.host, args.port)  # before the store is touched: a second server on a taken port
    from .serve.store import lock_data

    lock = None if args.db else lock_data(args.data)  # took the first's running jobs as crashed ones (its own)

    api_models = [m for m, w in weights.items() if w == "api"]  # `--model klein-4b=api`: klein on BFL's API
    if api_models or any(get_variant(m).hosted for m in weights):
        from .hosted import BflClient

        BflClient(location=args.api).close()  # no key: say so now, not at the first job

    def loader(model_id: str):
        if model_id in api_models:
            return load(model_id, backend="api", api={"location": args.api})
        return load(model_id, weights=weights.get(model_id), device=args.device, dtype=args.dtype, resident=True,
                    api={"location": args.api}, quantize=args.quantize, vram_budget=args.vram,
                    compile=args.compile, vae_tile=args.vae_tile)  # fmt: skip

    from .serve.app import run_app
    from .serve.limits import DEFAULT_LIMITS

    keep = None if args.keep_days is None else args.keep_days * 86400
    limits = dataclasses.replace(DEFAULT_LIMITS, max_disk_bytes=args.max_disk, upload_ttl_s=args.upload_ttl * 3600,
                                 keep_finished_s=keep)  # fmt: skip
    app = create_app(args.data, loader, token=token, cors_origins=args.cors or None, models=list(weights),
                     limits=limits,
                     lora_dir=args.lora_dir, api_models=api_models, db=args.db, files=args.files,
                     allowed_hosts=hosts)  # fmt: skip
    app.state.data_lock = lock  # held while the process lives
    print(f"Flux2 Studio on http://{args.host}:{args.port}  (data: {args.data}, models: {', '.join(weights)})")
    run_app(app, args.host, args.port, limits.shutdown_grace_s)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .nano.evaluate import evaluate

    model = args.model or "nano"
    if get_variant(model).hosted or args.backend == "api":
        raise ValueError(f"{model}: eval scores images of the Shapes world made by a local model (nano, "
                         "nano-base)")  # fmt: skip
    check_hosted_flags(model, args)
    seeds = tuple(parse_seeds(args.seeds))
    pipe = load_pipe(model, args)  # with its LoRAs, quantization, dtype: what the result names
    from tqdm import tqdm

    bar = tqdm(total=None, desc=f"eval {model}", unit="image", leave=False, disable=args.quiet)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    result = evaluate(pipe, seeds=seeds, limit=args.limit, steps=args.steps, guidance=args.guidance,
                      categories=args.category, guidance_interval=args.guidance_interval,
                      prompt_upsampling=args.prompt_upsampling, progress=progress)  # fmt: skip
    bar.close()
    print(json.dumps(dataclasses.asdict(result), indent=2) if args.json else result.table())
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .loading import pull

    print(f"{args.model}: {pull(args.model, four_bit=args.four_bit)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .conversion import convert

    print(convert(args.src, args.dst, args.to, args.quantize))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .conversion import describe

    info = describe(args.path)
    here = here_dtype()
    info["compute_dtype"] = {"dtype": here.name, "reason": here.reason}  # what --dtype auto runs it in here
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}\n  layout: {info['layout']}")
    for key in ("pipeline", "component"):
        if key in info:
            print(f"  {key}: {info[key]}")
    if "transformer" in info:
        t = info["transformer"]
        print(f"  transformer: hidden {t['hidden_size']}, {t['depth']} double + {t['depth_single']} single blocks, "
              f"context {t['context_dim']}, guidance embedding {'yes' if t['guidance_embed'] else 'no'}")  # fmt: skip
        models = " / ".join(info.get("models", [])) or "none registered (another shape: pass --model ID)"
        print(f"  models of this shape: {models}")
    print(f"  parameters: {info['params']:,}  dtypes: {info['dtypes']}")
    print(f"  computes here in: {here.name} ({here.reason})")
    for name, size in info["files"].items():
        print(f"  {size / 2**20:10.1f} MiB  {name}")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, as every other error of the command line (its subcommands' parsers
    are made of this class too)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="flux2", description="Run the FLUX.2 family on your own hardware.")
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list every model id with its size, defaults and licence")
    models.add_argument("--json", action="store_true", help="print a JSON list")
    models.set_defaults(func=cmd_models)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="model id (default: the embedded nano, or detected from --weights)")
        p.add_argument("--weights", help="weights file or folder (default: embedded / registered location)")
        p.add_argument("--vae", help="VAE file or folder (default: the weights' own: ae.safetensors beside a "
                       "single file, a folder's vae/, the embedded one for nano)")  # fmt: skip
        p.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
        p.add_argument("--vram", metavar="SIZE", help="accelerator memory a phase may use, weights and "
                       "work: 8GB, or auto (95%% of the free memory); blocks that do not fit stream in")  # fmt: skip
        p.add_argument("--vae-tile", type=int, metavar="PX", help="encode and decode larger images in overlapping "
                       "tiles of PX (128..2048, step 64) pixels: less memory, seams blended as diffusers")  # fmt: skip
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the transformer's blocks (GPUs; the first image compiles them)")  # fmt: skip
        p.add_argument("--dtype", choices=DTYPE_CHOICES,
                       help="auto (default): bf16 where the device computes it natively, else fp32")  # fmt: skip
        p.add_argument("--attention", choices=ATTENTION_MODES, help="auto (default): our bf16 CPU kernel where it runs")
        p.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                       help="pack the transformer's and text encoder's layers at load: int8 (int8 matmuls "
                            "on CPU), int4 (Q4_0 blocks) or fp8 (fp8 matmuls on GPUs with them: Ada, Hopper and "
                            "later); GGUF and convert --quantize files need none")  # fmt: skip
        p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
        p.add_argument("--guidance", type=float, help="guidance scale (CFG and guidance-embedded models)")
        p.add_argument(
            "--guidance-interval",
            type=parse_interval,
            metavar="LOW,HIGH",
            help="CFG models: guide only at noise levels LOW..HIGH (default: the model's; 0,1 = every step)",
        )
        p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="LoRA file (repeatable)")
        api = p.add_argument_group("hosted models (pro, max, flex, kontext-pro, kontext-max; klein with --backend api)")
        api.add_argument("--backend", choices=["local", "api"], default="local", help="api: klein on BFL's API")
        api.add_argument("--api", metavar="REGION|URL", help="global (default), eu, us, or a URL (or BFL_API_URL)")
        api.add_argument("--safety-tolerance", type=int, help="0 (strict) .. 5 (6 for Kontext); default 2")
        api.add_argument("--output-format", choices=["png", "jpeg"], help="the API's image format (default png)")
        p.add_argument(
            "--prompt-upsampling",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="rewrite the prompt first: nano's planner states all it leaves free (default on); the API's "
            "for flex and Kontext (default off)",
        )

    def output_args(p: argparse.ArgumentParser) -> None:
        size = p.add_mutually_exclusive_group()
        size.add_argument("--size", type=parse_size, help="WIDTHxHEIGHT, multiples of 16")
        size.add_argument("--aspect", choices=list(ASPECTS), help="size from the model's pixel count")
        p.add_argument("--negative", help="negative prompt (CFG models only)")
        p.add_argument("--seed", type=int, default=None, help="first seed (image i uses seed + i; default 0)")
        p.add_argument("--num", type=int, default=1, help="images per prompt")
        p.add_argument("-o", "--out", help="output PNG file or folder (default: outputs/)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
        p.add_argument("--text-encoder", help="text encoder folder (or a Qwen3 GGUF file), for single-file weights")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    def edit_args(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("editing a start image (image-to-image, inpainting, outpainting)")
        g.add_argument("--mask", metavar="IMAGE", help="inpaint: white = repaint, black = keep (any size: resized)")
        g.add_argument("--strength", type=float, help="0 < S <= 1: how far the start image is renoised "
                                                        "(default 0.75; 1 with a mask or expansion)")  # fmt: skip
        g.add_argument("--mask-blur", type=int, default=0, metavar="PX", help="soften the mask's edges (0..64 px)")
        grow = g.add_mutually_exclusive_group()
        grow.add_argument("--expand", type=parse_expand, metavar="L,T,R,B",
                          help="outpaint: pixels to add left, top, right, bottom (multiples of 16)")  # fmt: skip
        grow.add_argument("--canvas", type=parse_size, metavar="WxH", help="outpaint to this canvas (see --anchor)")
        g.add_argument("--anchor", choices=list(ANCHORS), help="where the image sits on --canvas (default center)")

    gen = sub.add_parser("generate", help="text to image (with --ref: multi-reference editing)")
    gen.add_argument("prompt", nargs="?")
    model_args(gen)
    output_args(gen)
    gen.add_argument("--init", metavar="IMAGE", help="start from this image (image-to-image; see --strength)")
    edit_args(gen)
    gen.add_argument("--ref", action="append", default=[], help="reference image (repeatable)")
    gen.add_argument("--prompts", help="a .txt (one prompt a line) or .jsonl (per-line settings) file")
    gen.add_argument("--from", dest="from_png", metavar="IMAGE.png", help="regenerate from a PNG's metadata")
    gen.set_defaults(func=cmd_generate)

    edit = sub.add_parser(
        "edit",
        help="edit with references, or inpaint / outpaint the first: IMAGE... PROMPT",
        usage="flux2 edit IMAGE [IMAGE ...] PROMPT [options]",
    )
    edit.add_argument("inputs", nargs="+", metavar="IMAGE... PROMPT")
    model_args(edit)
    output_args(edit)
    edit_args(edit)
    edit.set_defaults(func=cmd_edit)

    comp = sub.add_parser("compare", help="one prompt across models and seeds: a labelled grid and each image")
    comp.add_argument("prompt")
    comp.add_argument("--models", required=True, help="comma-separated model ids")
    comp.add_argument("--seeds", default="0", help="comma-separated seeds")
    model_args(comp)
    output_args(comp)
    for action in comp._actions:  # refused by compare (COMPARE_REFUSES): not offered in its help
        if set(action.option_strings) & set(COMPARE_REFUSES):
            action.help = argparse.SUPPRESS
    comp.set_defaults(func=cmd_compare)

    ev = sub.add_parser("eval", help="prompt-adherence eval of an embedded model on the Shapes world")
    model_args(ev)
    ev.add_argument("--seeds", default="0,1,2", help="comma-separated seeds per prompt")
    ev.add_argument("--limit", type=int, help="evaluate an evenly spread subset of N prompts")
    ev.add_argument("--category", action="append", metavar="NAME",
                    help="only this prompt category, repeatable: one_two, three_four, relation or negation "
                    "(64 prompts each: a quick probe)")  # fmt: skip
    ev.add_argument("--json", action="store_true")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    pl = sub.add_parser("pull", help="download a model's weights from Hugging Face (resumable)")
    pl.add_argument("model")
    pl.add_argument(
        "--4bit",
        dest="four_bit",
        action="store_true",
        help="its copy in bitsandbytes NF4, where one is published (dev: diffusers/FLUX.2-dev-bnb-4bit)",
    )
    pl.set_defaults(func=cmd_pull)

    conv = sub.add_parser("convert", help="convert a transformer or VAE between layouts (diffusers, BFL, GGUF), "
                          "optionally quantized")  # fmt: skip
    conv.add_argument("src", help="single .safetensors / .gguf file, or a component folder (transformer/, vae/, or a "
                      "text encoder: --to bfl --quantize int8|int4|fp8 writes it packed, as a folder; a Qwen3 one --to "
                      "gguf as one file with llama.cpp's names and its tokenizer)")  # fmt: skip
    conv.add_argument("dst", help="new folder (--to diffusers), .safetensors file (--to bfl) or .gguf file (--to gguf)")
    conv.add_argument("--to", choices=["diffusers", "bfl", "gguf"], required=True)
    conv.add_argument("--quantize", help="bfl: int8, int4 or fp8 (loaded without re-quantizing); gguf: q8_0, q4_0, "
                      "f16 or bf16 (default bf16; files stable-diffusion.cpp and ComfyUI-GGUF load)")  # fmt: skip
    conv.set_defaults(func=cmd_convert)

    info = sub.add_parser("info", help="layout, detected model, dtypes, parameter count and file sizes of weights")
    info.add_argument("path")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    srv = sub.add_parser("serve", help="HTTP API, job queue and studio page (pip install flux2studio[serve])")
    srv.add_argument("--host", default="127.0.0.1", help="other than loopback needs --token")
    srv.add_argument("--port", type=int, default=7860)
    srv.add_argument("--data", default="flux2-data", help="job store (SQLite) and images")
    srv.add_argument(
        "--token", help="bearer token required on every API call; prefer FLUX2_TOKEN (other users see arguments in ps)"
    )
    srv.add_argument(
        "--model",
        action="append",
        metavar="ID[=WEIGHTS]",
        help="serve this model (repeatable); klein-4b=api: klein on BFL's API",
    )
    srv.add_argument("--cors", action="append", metavar="ORIGIN", help="allow browser calls from ORIGIN")
    srv.add_argument(
        "--max-disk",
        type=disk_bytes,
        metavar="SIZE",
        help="bound images and uploads on disk, e.g. 20GB (beyond: new jobs and uploads get 507)",
    )
    srv.add_argument(
        "--upload-ttl",
        type=float,
        default=24.0,
        metavar="HOURS",
        help="delete uploads no queued or running job names after this long (default 24)",
    )
    srv.add_argument(
        "--keep-days",
        type=float,
        metavar="DAYS",
        help="delete finished jobs and their images after this many days (default: keep them)",
    )
    srv.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="serve requests for this Host name too (default: loopback names and --host; '*': any)",
    )
    srv.add_argument("--lora-dir", help="folder of LoRA files jobs may name")
    srv.add_argument("--api", metavar="REGION|URL", help="BFL API for hosted models: global, eu, us or a URL")
    srv.add_argument("--db", help="job store: postgresql://user@host/db (shared by servers); default SQLite in --data")
    srv.add_argument("--files", help="folder for images and uploads (default: --data); shared across servers")
    srv.add_argument("--ray", action="store_true", help="deploy on Ray Serve (pip install flux2studio[scale])")
    srv.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    srv.add_argument("--config", help="Ray Serve settings (YAML): replicas, autoscaling, GPUs, models, budget")
    srv.add_argument("--device")
    srv.add_argument("--vram", metavar="SIZE", help="accelerator memory a phase may use (see generate --vram)")
    srv.add_argument("--compile", action="store_true", help="torch.compile the transformer's blocks (see generate)")
    srv.add_argument("--vae-tile", type=int, metavar="PX", help="VAE in tiles for larger images (see generate)")
    srv.add_argument("--dtype", choices=DTYPE_CHOICES)
    srv.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="pack the served models' layers: int8, int4 or fp8")
    srv.set_defaults(func=cmd_serve)

    train = sub.add_parser("train", help="train: the embedded model (nano) or a LoRA (lora)")
    kinds = train.add_subparsers(dest="what", required=True)
    tr = kinds.add_parser("nano", help="the embedded model, stage by stage (vae, base, distill)")
    tr.add_argument("--stage", choices=["vae", "base", "distill"], required=True)
    tr.add_argument("--out", default="runs/nano", help="checkpoints and logs; a rerun resumes from here")
    tr.add_argument("--steps", type=int, default=1000)
    tr.add_argument("--batch", type=int, default=16)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--warmup", type=int, default=100)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--ckpt-every", type=int, default=200)
    tr.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (base, distill)")
    tr.add_argument("--stop-after", type=int, default=0, metavar="N",
                    help="stop after step N (a checkpoint is written); the schedule still spans --steps")  # fmt: skip
    tr.add_argument("--max-minutes", type=float, default=0.0, metavar="M",
                    help="stop after the step that passes M minutes (with a checkpoint); 0: no limit")  # fmt: skip
    tr.add_argument("--device", default="cpu", help="where the models train: cpu (default) or cuda")
    tr.add_argument("--workers", type=int, default=0,
                    help="processes that render the next batches during training (same data as 0, faster)")  # fmt: skip
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="stage option, e.g. shift=6")
    tr.set_defaults(func=cmd_train)

    lo = kinds.add_parser("lora", help="a LoRA on a Base model from captioned images")
    lo.add_argument("data", help="folder (image + same-name .txt, optional NAME.ref.png) or .jsonl")
    lo.add_argument("--model", default="nano-base", help="a Base variant: nano-base, klein-base-4b, klein-base-9b")
    lo.add_argument("--weights", help="weights of the Base model (default: embedded / HF cache)")
    lo.add_argument("--device")
    lo.add_argument("--dtype", choices=DTYPE_CHOICES)
    lo.add_argument("--out", default="runs/lora", help="checkpoints, samples and lora.safetensors; resumes")
    lo.add_argument("--rank", type=int, default=16)
    lo.add_argument("--alpha", type=float, default=16.0)
    lo.add_argument("--lr", type=float, default=1e-4)
    lo.add_argument("--steps", type=int, default=500)
    lo.add_argument("--batch", type=int, default=1)
    lo.add_argument(
        "--resolution",
        type=int,
        help="pixel budget side: buckets hold ~R*R pixels (default 512, or the model's largest side)",
    )
    lo.add_argument("--caption-dropout", type=float, default=0.05)
    lo.add_argument("--grad-checkpointing", action="store_true")
    lo.add_argument("--mode", choices=["t2i", "edit"], default="t2i", help="edit: a reference image per sample")
    lo.add_argument("--sample-every", type=int, default=0, help="a sample image per --sample-prompt every N steps")
    lo.add_argument("--sample-prompt", action="append", default=[])
    lo.add_argument("--sample-steps", type=int, help="steps of the samples (default: the model's); size: R x R")
    lo.add_argument("--ckpt-every", type=int, default=100)
    lo.add_argument("--seed", type=int, default=0)
    lo.add_argument("--kohya", action="store_true", help="also save the ComfyUI/kohya layout")
    lo.set_defaults(func=cmd_train_lora)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "inputs", None) is not None and not any(e.startswith("-") for e in extra):
        args.inputs += extra  # `edit IMAGE --expand 0,0,256,0 PROMPT`: positionals after an option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.seed_given = getattr(args, "seed", None) is not None
    if getattr(args, "seed", 0) is None:
        args.seed = 0
    show_notes(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `flux2 models --json | head`: the reader stopped; nothing more to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's flush at exit would fail too)
        return 0
    except Exception as e:  # one actionable line; --debug shows the traceback
        print(f"error: {explain(e)}", file=sys.stderr)
        return 2


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line comes (tests swap it between in-process runs)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def show_notes(level: int) -> None:
    """The package's log lines at `level` and above on stderr, one line each: why a reference was resized, why a
    batch was denoised in parts or the VAE worked in tiles (`-q`: warnings only)."""
    logger = logging.getLogger("flux2studio")
    logger.setLevel(logging.INFO)  # what reaches handlers; the line's own handler filters by `level`
    handler = next((h for h in logger.handlers if isinstance(h, _Stderr)), None)
    if handler is None:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    handler.setLevel(level)


def explain(e: Exception) -> str:
    import torch

    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
        return (f"out of memory ({str(e).splitlines()[0]}): try --quantize int8 or int4, --dtype bf16 or fp16, "
                "a smaller --size, fewer images per call (--num), or a smaller model")  # fmt: skip
    return str(e).splitlines()[0] if str(e) else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
