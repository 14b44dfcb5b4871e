"""LoRA fine-tuning of a Base checkpoint (klein-base-4b/9b, nano-base) on captioned images.

Data: a folder of images with a caption file of the same name (`cat.png` + `cat.txt`; an optional
`cat.ref.png` is the reference image of edit mode), or a .jsonl with "image", "caption" and "ref".
Images are sorted into aspect-ratio buckets at the pixel budget `resolution`**2 and centre-cropped, never
stretched. Latents and text embeddings are computed once, then the VAE and text encoder are freed, and
the frozen transformer with PEFT LoRA layers learns the rectified-flow objective. Saved in the
diffusers/PEFT layout (diffusers' `load_lora_weights` reads it) and optionally the kohya layout.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .. import sampling
from ..images import ASPECTS, open_reference, save_png, size_for_aspect, to_tensor
from ..lora import _diffusers_names
from ..pipeline import MAX_STEPS, Pipeline, build_request, whole
from ..settings import GenerationSettings
from ..variants import Variant
from .common import checkpoint_meta, flow_loss, lr_at, optimizer_tensors, restore_optimizer, save_checkpoint

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
log = logging.getLogger(__name__)
# Our Linear names the LoRA adapts by default: attention and MLP of both block kinds (as ai-toolkit does).
DEFAULT_TARGETS = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                   "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")  # fmt: skip


@dataclass(frozen=True)
class LoraTrainConfig:
    data: str
    out: str = "runs/lora"
    rank: int = 16
    alpha: float = 16.0
    lr: float = 1e-4
    steps: int = 500
    batch: int = 1
    warmup: int = 20
    resolution: int | None = None  # pixel budget: resolution**2 pixels per image, at the bucket's aspect;
    # None: a resumed run's, else `default_resolution`
    caption_dropout: float = 0.05
    grad_checkpointing: bool = False
    mode: str = "t2i"  # "t2i" or "edit" (one reference image per sample)
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int | None = None  # None: the model's default; samples are resolution x resolution
    ckpt_every: int = 100
    seed: int = 0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    save_kohya: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Every value in range before a model is loaded (a clear error naming it, not a library's later)."""
        positive = {"rank": self.rank, "steps": self.steps, "batch": self.batch, "ckpt_every": self.ckpt_every,
                    **({"resolution": self.resolution} if self.resolution is not None else {})}  # fmt: skip
        for name, value in positive.items():
            if not whole(value) or value < 1:
                raise ValueError(f"{name} {value!r} must be a whole number of at least 1")
        for name, value in {"warmup": self.warmup, "sample_every": self.sample_every, "seed": self.seed}.items():
            if not whole(value) or value < 0:
                raise ValueError(f"{name} {value!r} must be a whole number of at least 0")
        if not 0 < self.lr <= 1:  # (also refuses NaN)
            raise ValueError(f"learning rate {self.lr!r} is out of range (0, 1]")
        if not 0 < self.alpha <= 4096:
            raise ValueError(f"alpha {self.alpha!r} is out of range (0, 4096]")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption dropout {self.caption_dropout!r} is out of range [0, 1)")
        if self.mode not in ("t2i", "edit"):
            raise ValueError(f"mode {self.mode!r}: t2i or edit")
        if bool(self.sample_every) != bool(self.sample_prompts):  # one without the other made no samples, silently
            raise ValueError("samples need both --sample-every N and --sample-prompt P (sample_every, sample_prompts)")
        if self.resolution is not None and (self.resolution % 16 or self.resolution < 64):
            raise ValueError(f"resolution {self.resolution} must be a multiple of 16, at least 64")


@dataclass
class Sample:
    image: Path
    caption: str
    ref: Path | None = None


def read_dataset(path: str | Path, mode: str) -> list[Sample]:
    """Samples from a folder (image + same-name .txt or .caption, also in kohya's `N_name` subfolders; or its
    `metadata.jsonl`, as Hugging Face's imagefolder has it) or a .jsonl of {"image" (or "file_name"), "caption"
    (or "text"), "ref"}; errors name the file and line. What is left out (other image types, other subfolders)
    is logged."""
    path = Path(path)
    if path.is_dir() and (path / "metadata.jsonl").is_file():
        samples = _read_jsonl(path / "metadata.jsonl")
    elif path.suffix == ".jsonl":
        samples = _read_jsonl(path)
    elif path.is_dir():
        kohya = [p for p in sorted(path.iterdir()) if p.is_dir() and KOHYA_FOLDER.fullmatch(p.name) and _captioned(p)]
        samples = [s for folder in (path, *kohya) for s in _read_folder(folder)]  # (repeat counts: each image once)
        left = [p.name for p in sorted(path.iterdir()) if (p.is_dir() and p not in kohya)
                or p.suffix.lower() in OTHER_IMAGES]  # fmt: skip
        if left:
            log.warning("%s: left out %s (images: %s; subfolders: kohya's N_name)", path, ", ".join(left[:8]),
                        "/".join(IMAGE_SUFFIXES))  # fmt: skip
    else:
        raise FileNotFoundError(f"training data {path} is neither a folder nor a .jsonl file")
    if not samples:
        raise ValueError(f"no training samples in {path}")
    if mode == "edit" and any(s.ref is None for s in samples):
        missing = [s.image.name for s in samples if s.ref is None][:5]
        raise ValueError(f"edit mode needs a reference image for every sample; missing for {missing}")
    for file in (f for s in samples for f in (s.image, s.ref) if f is not None):
        _check_image(file)  # decoded whole before a model is loaded (a truncated file failed after it loaded)
    return samples


KOHYA_FOLDER = re.compile(r"\d+_.+")  # kohya's sd-scripts: REPEATS_NAME
OTHER_IMAGES = (".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic")  # not read (said)


def _read_jsonl(path: Path) -> list[Sample]:
    samples = []
    for n, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not JSON ({e.msg}, column {e.colno})") from None
        captioned = isinstance(row, dict) and ("caption" in row or "text" in row)
        if isinstance(row, dict):  # Hugging Face's imagefolder names them file_name and text
            row = {"image": row.get("image", row.get("file_name")), "caption": row.get("caption", row.get("text")),
                   "ref": row.get("ref")}  # fmt: skip
        if not isinstance(row, dict) or row["image"] is None or not captioned:
            raise ValueError(f'{path} line {n}: needs "image" and "caption" (or "file_name" and "text")')
        wrong = [k for k in ("image", "caption", "ref") if row[k] is not None and not isinstance(row[k], str)]
        if wrong or not isinstance(row["caption"], str):  # (were Python's errors, after the model loaded)
            raise ValueError(f"{path} line {n}: {', '.join(wrong or ['caption'])} must be text")
        ref = path.parent / row["ref"] if row.get("ref") else None
        for file in (path.parent / row["image"], ref):
            if file is not None and not file.is_file():
                raise ValueError(f"{path} line {n}: no image file {file}")
        samples.append(Sample(path.parent / row["image"], row["caption"], ref))
    return samples


def _captioned(folder: Path) -> bool:
    """A folder with caption files (a kohya `N_name` one; not a "2024_trip" of photos)."""
    return any(folder.glob("*.txt")) or any(folder.glob("*.caption"))


def _read_folder(folder: Path) -> list[Sample]:
    samples = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if image.stem.endswith(".ref"):
            continue
        caption = next((c for s in (".txt", ".caption") if (c := image.with_suffix(s)).is_file()), None)
        if caption is None:
            raise ValueError(f"{image} has no caption file {image.with_suffix('.txt').name} (or .caption)")
        text = _text(caption).strip()
        ref = next((r for s in IMAGE_SUFFIXES if (r := image.with_name(image.stem + ".ref" + s)).is_file()), None)
        samples.append(Sample(image, text, ref))
    return samples


def _text(path: Path) -> str:
    """A caption or .jsonl file's text: UTF-8, a byte-order mark dropped (it was kept in the caption), anything
    else named with the file (was Python's error without it)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check_image(path: Path) -> None:
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"cannot read training image {path}: {e}") from None


def training_image(path: Path) -> Image.Image:
    """A training image (or reference) as the pipelines read references (EXIF-upright phone photos, 16-bit greys
    scaled, RGB)."""
    return open_reference(path, "training image")


def import_peft():
    """peft (the `train` extra), imported offline: it imports bitsandbytes where that is installed, which on
    AVX512-BF16 CPUs asks the Hugging Face Hub for a kernel and warns when it cannot have one (neither is used
    here; nothing is fetched at run time)."""
    import logging

    import huggingface_hub.constants as hub

    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    levels, offline = [lg.level for lg in loggers], hub.HF_HUB_OFFLINE
    try:
        hub.HF_HUB_OFFLINE = True
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        import peft
    except ImportError:
        raise ImportError("LoRA training needs peft: pip install 'flux2studio[train]'") from None
    finally:
        hub.HF_HUB_OFFLINE = offline
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return peft


def check_trainable(variant: Variant) -> None:
    """LoRAs train on a Base variant (real CFG): a distilled or hosted model is an error."""
    if variant.guidance_mode == "none" or variant.hosted:
        raise ValueError(f"{variant.id} is {'hosted' if variant.hosted else 'distilled'}: train LoRAs on a Base "
                         "variant (nano-base, klein-base-4b, klein-base-9b)")  # fmt: skip


def default_resolution(variant: Variant) -> int:
    """512, or the model's largest side where that is smaller (nano-base: 256)."""
    return min(512, variant.max_side)


def check_rank(variant: Variant, rank: int) -> None:
    """A rank no larger than the model's width: the adapted layers are at least that wide, so a larger rank adds
    nothing but memory (a rank of 100000 on nano-base took the machine's 23 GB, then the OOM killer)."""
    if rank > (width := variant.transformer.hidden_size):
        raise ValueError(f"rank {rank} is above {variant.id}'s width {width}: at rank {width} a LoRA already "
                         f"changes its layers fully (--rank 1..{width})")  # fmt: skip


def check_resolution(variant: Variant, resolution: int) -> None:
    """The training resolution (a bucket's side, about) within the sides the model takes."""
    if not variant.min_side <= resolution <= variant.max_side:
        raise ValueError(f"resolution {resolution} is outside {variant.id}'s sides {variant.min_side}.."
                         f"{variant.max_side} (--resolution)")  # fmt: skip


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The aspect bucket closest to the image's aspect, at resolution**2 pixels."""
    ratio = math.log(width / height)
    best = min(ASPECTS, key=lambda a: abs(math.log(int(a.split(":")[0]) / int(a.split(":")[1])) - ratio))
    return size_for_aspect(best, resolution * resolution)


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to cover `size`, then centre-crop to it (no stretching)."""
    w, h = size
    scale = max(w / image.width, h / image.height)
    resized = image.convert("RGB").resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                                          Image.Resampling.LANCZOS)  # fmt: skip
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    return resized.crop((left, top, left + w, top + h))


@torch.no_grad()
def precompute(pipe: Pipeline, samples: list[Sample], cfg: LoraTrainConfig) -> list[dict]:
    """Latents, text embeddings (and reference tokens) for every sample; then the encoders are freed."""
    items = []
    captions = sorted({s.caption for s in samples} | {""})
    embeds = dict(zip(captions, pipe.encode_prompts(captions).float(), strict=True))
    pipe.release("text_encoder")
    for s in samples:
        im = training_image(s.image)
        size = bucket_size(im.width, im.height, cfg.resolution)
        z = pipe.vae.encode(to_tensor(fit(im, size)).to(pipe.device, pipe.dtype)).float()
        item = {"z": z, "caption": s.caption, "size": size}
        if s.ref is not None and cfg.mode == "edit":
            r = training_image(s.ref)
            zr = pipe.vae.encode(to_tensor(fit(r, bucket_size(r.width, r.height, cfg.resolution)))
                                 .to(pipe.device, pipe.dtype)).float()  # fmt: skip
            item["ref"] = sampling.pack(zr)
            item["ref_ids"] = sampling.reference_ids([tuple(zr.shape[-2:])])
        items.append(item)
    pipe.release("vae")
    return [{**it, "txt": embeds[it["caption"]], "empty": embeds[""]} for it in items]


def _bucket(item: dict) -> tuple:
    """Samples batch together when their target sizes match and, in edit mode, their references' too."""
    return item["size"], tuple(item["ref"].shape) if "ref" in item else None


def lora_config(cfg: LoraTrainConfig, model: nn.Module):
    from peft import LoraConfig

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(cfg.targets)]
    if not names:
        raise ValueError(f"no layer matches targets {cfg.targets}")
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=names, init_lora_weights=True)


def to_diffusers_layout(sd: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Our LoRA names -> diffusers/PEFT names: a fused qkv LoRA becomes q, k, v sharing A (exact)."""
    reverse: dict[str, list[tuple[str, int, int, bool]]] = {}
    for theirs, (ours, part, n, swap) in _diffusers_names(model).items():
        reverse.setdefault(ours, []).append((theirs, part, n, swap))
    out = {}
    for key, value in sd.items():
        module, factor = key.rsplit(".lora_", 1)  # factor: "A.weight" / "B.weight"
        for theirs, part, n, swap in reverse[module]:
            if factor.startswith("A"):
                out[f"transformer.{theirs}.lora_A.weight"] = value.clone()  # q, k, v each get their own copy
            else:
                rows = value.chunk(n, dim=0)[part]
                if swap:
                    a, b = rows.chunk(2)
                    rows = torch.cat([b, a])
                out[f"transformer.{theirs}.lora_B.weight"] = rows.contiguous()
    return out


def to_kohya_layout(sd: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        module, factor = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{'down' if factor.startswith('A') else 'up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save_lora(model: nn.Module, cfg: LoraTrainConfig, path: Path) -> list[Path]:
    from peft.utils import get_peft_model_state_dict

    from ..checkpoints import write_safetensors

    sd = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()}
    diffusers_sd = to_diffusers_layout(sd, model)
    # diffusers builds its PEFT LoraConfig from this metadata, so it lists the target modules too
    targets = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in diffusers_sd})
    # keys namespaced by component, as diffusers' save_lora_weights writes them
    adapter = {"transformer.r": cfg.rank, "transformer.lora_alpha": cfg.alpha, "transformer.target_modules": targets}
    meta = {"lora_adapter_metadata": json.dumps(adapter), "flux2studio": json.dumps({"config": asdict(cfg)})}
    path.unlink(missing_ok=True)
    write_safetensors(diffusers_sd, path, meta)
    written = [path]
    if cfg.save_kohya:
        kohya = path.with_name(path.stem + ".kohya.safetensors")
        kohya.unlink(missing_ok=True)
        write_safetensors(to_kohya_layout(sd, cfg.alpha), kohya)
        written.append(kohya)
    return written


# Settings a run may change when it resumes from its checkpoint; any other change is a different run.
RESUMABLE_CHANGES = (
    "steps",
    "sample_every",
    "sample_prompts",
    "sample_steps",
    "ckpt_every",
    "save_kohya",
    "grad_checkpointing",
)


def resume_step(ckpt: Path, cfg: LoraTrainConfig) -> int:
    """The step to continue from: 0 without a checkpoint; an error if the checkpoint is of other settings."""
    if not ckpt.exists():
        return 0
    meta = checkpoint_meta(ckpt)
    saved, now = json.loads(meta["config"]), json.loads(json.dumps(asdict(cfg)))  # tuples as JSON lists
    # the checkpoint is in --out: the same run however its folder is named; --data the same folder however given
    same = ["out", *(["data"] if Path(str(saved.get("data"))).resolve() == Path(cfg.data).resolve() else [])]
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items()
               if k not in (*RESUMABLE_CHANGES, *same) and saved.get(k) != v]  # fmt: skip
    if changed:
        raise ValueError(f"{ckpt} is a run with other settings ({'; '.join(changed)}): resume with the same "
                         "settings, or pass another --out")  # fmt: skip
    step = int(meta["step"])
    if step > cfg.steps:
        raise ValueError(f"{ckpt} is at step {step}, past --steps {cfg.steps}: pass --steps {step} or more to "
                         "continue it, or another --out")  # fmt: skip
    return step


def sample_settings(pipe: Pipeline, cfg: LoraTrainConfig, samples: list[Sample]) -> GenerationSettings | None:
    """What the sample images are made with (checked now, before training): the sample prompts at the training
    resolution (square, a multiple of 16), `sample_steps` or the model's steps; in edit mode, as the LoRA is
    meant to be used, with the first sample's reference image."""
    if not cfg.sample_every:
        return None
    side = max(16, cfg.resolution // 16 * 16)
    refs = [training_image(samples[0].ref)] if cfg.mode == "edit" else []
    settings = GenerationSettings(list(cfg.sample_prompts), size=(side, side), steps=cfg.sample_steps, seed=cfg.seed,
                                  refs=refs)  # fmt: skip
    if cfg.sample_steps is not None and not (whole(cfg.sample_steps) and 1 <= cfg.sample_steps <= MAX_STEPS):
        raise ValueError(f"sample steps {cfg.sample_steps!r} is out of range 1..{MAX_STEPS} (--sample-steps)")
    build_request(pipe.variant, settings)  # an error names the value and its range
    return settings


def train_lora(
    pipe: Pipeline, cfg: LoraTrainConfig, log: Callable[[dict], None], samples: list[Sample] | None = None
) -> Path:
    """Train; resumable from OUT/lora.ckpt.safetensors. Returns the final LoRA file (diffusers layout). `samples`:
    `read_dataset(cfg.data, cfg.mode)` where the caller has read (and checked) them already."""
    import_peft()
    from peft import inject_adapter_in_model
    from peft.utils import set_peft_model_state_dict

    check_trainable(pipe.variant)  # (the mode: LoraTrainConfig's own check)
    check_rank(pipe.variant, cfg.rank)
    out = Path(cfg.out)
    ckpt = out / "lora.ckpt.safetensors"
    if cfg.resolution is None:  # a resumed run's own (runs before this default: 512 on any model), else the default
        saved = json.loads(checkpoint_meta(ckpt)["config"]).get("resolution") if ckpt.exists() else None
        cfg = replace(cfg, resolution=saved or default_resolution(pipe.variant))
    start = resume_step(ckpt, cfg)  # checked before the (slow) precomputation
    if not start:  # (a run begun before this check resumes as it began)
        check_resolution(pipe.variant, cfg.resolution)
    samples = read_dataset(cfg.data, cfg.mode) if samples is None else samples
    sample = sample_settings(pipe, cfg, samples)  # checked before any work, like the data and the checkpoint
    out.mkdir(parents=True, exist_ok=True)
    data = precompute(pipe, samples, cfg)
    resident = pipe.parts["transformer"].resident
    pipe.parts["transformer"].resident = True  # the LoRA lives in this object: never reload it mid-training
    model = pipe.transformer
    model.requires_grad_(False)
    with torch.random.fork_rng():  # PEFT draws lora_A from the global generator: seed it, leave it as it was
        torch.manual_seed(cfg.seed)
        model = inject_adapter_in_model(lora_config(cfg, model), model)
    model.train()
    model.grad_checkpointing = cfg.grad_checkpointing
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()  # LoRA factors train in fp32 whatever the base dtype
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    names = {p: n for n, p in model.named_parameters() if "lora_" in n}
    if start:
        from safetensors.torch import load_file

        sd = load_file(str(ckpt))
        set_peft_model_state_dict(model, {k[5:]: v for k, v in sd.items() if k.startswith("lora.")})
        restore_optimizer(opt, names, sd)
    try:
        return _train(pipe, model, cfg, data, opt, names, start, ckpt, sample, log)
    finally:  # the pipeline as it was: its layers unwrapped (later calls made LoRA-changed images recorded as
        _unwrap(model)  # plain ones, and set_loras failed on the wrapped layers), loaded per phase again
        model.requires_grad_(False)
        model.eval()
        pipe.parts["transformer"].resident = resident


def _unwrap(model: nn.Module) -> None:
    """The layers PEFT wrapped in place given back their own Linear (`base_layer`)."""
    for name, module in list(model.named_modules()):
        if name and hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.base_layer)
    if hasattr(model, "peft_config"):  # (a second run on the same model warned of "multiple adapters")
        del model.peft_config


def _train(pipe: Pipeline, model: nn.Module, cfg: LoraTrainConfig, data: list[dict], opt, names: dict, start: int,
           ckpt: Path, sample: GenerationSettings | None, log: Callable[[dict], None]) -> Path:  # fmt: skip
    """`train_lora`'s loop; interrupted (Ctrl+C), it saves the checkpoint at the last finished step first (the
    steps since the last checkpoint were lost)."""
    from peft.utils import get_peft_model_state_dict

    def checkpoint(done: int) -> None:
        state = {f"lora.{k}": v for k, v in get_peft_model_state_dict(model).items()}
        config = asdict(replace(cfg, data=str(Path(cfg.data).resolve())))  # (resumed from anywhere)
        save_checkpoint(ckpt, done, state | optimizer_tensors(opt, names), config)

    params, out, updating = list(names), Path(cfg.out), [False]
    t0, done, saved = time.time(), start, start
    try:
        for step in range(start, cfg.steps):
            loss = _step(model, cfg, data, opt, params, step, updating)
            done = step + 1
            log({"step": done, "loss": loss, "s": round(time.time() - t0, 1)})
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                checkpoint(done)
                saved = done
            if sample is not None and done % cfg.sample_every == 0:
                model.eval()
                with torch.no_grad():
                    for i, image in enumerate(pipe(sample)):
                        path = out / f"sample-{done:05d}-{i}.png"
                        path.unlink(missing_ok=True)  # a resumed run makes it again
                        save_png(image, path)  # with its settings, as `flux2 generate` writes them
                model.train()
    except KeyboardInterrupt:
        if done > saved and not updating[0]:  # (mid-update, some factors have the next step's values: not saved)
            checkpoint(done)
        raise
    model.eval()
    return save_lora(model, cfg, out / "lora.safetensors")[0]


def _step(model: nn.Module, cfg: LoraTrainConfig, data: list[dict], opt, params: list, step: int,
          updating: list[bool]) -> float:  # fmt: skip
    """One optimisation step (its batch, timesteps and noise drawn from the seed and the step: resumable);
    `updating[0]` while the factors change."""
    rng = np.random.default_rng([cfg.seed, step])
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    first = data[rng.integers(len(data))]
    same = [d for d in data if _bucket(d) == _bucket(first)]  # a batch shares one bucket
    batch = [first] + [same[i] for i in rng.integers(len(same), size=cfg.batch - 1)]
    z = torch.cat([b["z"] for b in batch])
    txt = torch.stack([b["empty"] if rng.random() < cfg.caption_dropout else b["txt"] for b in batch])
    ref = torch.cat([b["ref"] for b in batch]) if cfg.mode == "edit" else None
    t = torch.rand(len(batch), generator=g)
    noise = torch.randn(z.shape, generator=g)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
    loss = flow_loss(model, z, txt.to(z), t, noise, ref, batch[0].get("ref_ids"))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    updating[0] = True
    opt.step()
    updating[0] = False
    return loss.item()
