"""Components + one call: prompts (+ reference images, + a start image and mask) -> images.

The pipeline validates a request completely before any work, encodes the prompts, encodes the
references and the start image, integrates the flow and decodes. Numerics follow diffusers 0.42.1's
`Flux2Pipeline`, `Flux2KleinPipeline`, `Flux2KleinKVPipeline` and `Flux2KleinInpaintPipeline` (tested for
parity). It does not read files: see `checkpoints` for building one from weights.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from . import __version__, sampling
from .caches import LATENT_CACHE_BYTES, PROMPT_CACHE_BYTES, TensorCache
from .checkpoints import cache_dir, weights_hash
from .device_streaming import (
    available_ram,
    check_whole,
    human,
    least_held,
    module_bytes,
    plan_blocks,
    stream_to_device,
    to_host,
)
from .editing import Init, build_init, fitted, paste_kept
from .images import (
    check_size,
    image_hash,
    open_image,
    parameters_text,
    pixels_digest,
    prepare_reference,
    size_for_aspect,
    to_pil,
    to_tensor,
)
from .kernels.attention import attention_for
from .lora import Applied, LoraFile, apply_loras, check_scale, load_lora
from .model.autoencoder import AutoEncoder
from .model.transformer import Flux2Transformer
from .quantize import constant_when_compiled, multiplies_int8
from .quantized_files import transformer_sizes
from .residency import reuse_freed_memory, stop_streaming_weights, trim_heap
from .settings import GenerationSettings
from .text_encoders import TextEncoder
from .variants import AutoencoderConfig, Variant, parse_size
from .work_memory import text_encoder_work, transformer_work, vae_work, vae_work_bound

MAX_STEPS = 200
VAE_TILES = range(128, 2049, 64)  # tile sides (pixels) the VAE may decode in
AUTO_TILES = (1024, 768, 512, 384, 256)  # tried in turn under a device budget where the VAE does not fit whole
RAM_SHARE = 0.9  # on a CPU without a device budget: a call plans its phases within this share of available memory
MAX_IMAGES = 64  # images per call (prompts x num_images)
GUIDANCE_RANGE = (1.0, 30.0)
T = TypeVar("T")
M = TypeVar("M", bound=torch.nn.Module)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """A fully validated generation request: every default resolved, every value in range."""

    prompts: tuple[str, ...]
    negative_prompt: str | None  # None unless the model runs real CFG
    width: int
    height: int
    steps: int
    guidance: float
    seeds: tuple[int, ...]  # one per output image, prompt-major
    refs: tuple[Image.Image, ...]  # already prepared (validated, cropped)
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # noise levels CFG applies at (sampling.cfg_velocity)
    prompt_upsampling: bool = False
    texts: tuple[str, ...] = ()  # what the text encoder reads, one per image: the prompts, or them upsampled
    init: Init | None = None  # image-to-image (no mask), inpainting or outpainting (mask): `editing.build_init`

    @property
    def batch(self) -> int:
        return len(self.seeds)


def build_request(variant: Variant, prompt: str | Sequence[str] | GenerationSettings, **fields: Any) -> Request:
    """Resolve defaults and check every value against the variant; errors name the value and the range.

    `prompt_upsampling` (default: on where the model has an upsampler) rewrites each prompt before encoding,
    per image from its seed (the nano models: every attribute the prompt leaves free stated, `nano.planner`).
    `image` starts from that image (image-to-image; `strength` in (0, 1], default 0.75); with `mask` (white =
    repaint) or `expand` (px LEFT, TOP, RIGHT, BOTTOM added: outpainting) only that area is generated (strength
    default 1) and the start image is also the first reference, as in diffusers' inpainting pipeline
    (`Variant.inpaint_reference`).
    """
    if not isinstance(prompt, str | GenerationSettings | Sequence):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    s = with_seeds_counted(opened_settings(GenerationSettings.of(prompt, **fields)))
    prompts, num_images = s.prompts, s.num_images
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    if not whole(num_images) or num_images < 1:
        raise ValueError(f"num_images {num_images!r} is out of range: a whole number from 1")
    if len(prompts) * num_images > MAX_IMAGES:
        raise ValueError(f"{len(prompts)} prompt(s) x {num_images} image(s) = {len(prompts) * num_images} images: at "
                         f"most {MAX_IMAGES} a call (split the list)")  # fmt: skip
    if s.prompt_upsampling is not None and not isinstance(s.prompt_upsampling, bool):  # ("no" was yes)
        raise ValueError(f"prompt_upsampling must be True, False or None, got {s.prompt_upsampling!r}")
    for name in ("guidance", "strength"):  # (True was taken as 1.0)
        if isinstance(getattr(s, name), bool):
            raise ValueError(f"{name} must be a number, got {getattr(s, name)!r}")
    steps = variant.steps if s.steps is None else s.steps
    if not whole(steps):
        raise ValueError(f"steps {steps!r} is not a whole number (1..{MAX_STEPS})")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps {steps!r} is out of range 1..{MAX_STEPS}")

    guidance, negative_prompt, (lo, hi) = _guidance(variant, s.guidance, s.negative_prompt, s.guidance_interval)

    prepared = _references(variant, s.refs, s.image, s.mask, s.strength, s.expand, s.mask_blur)
    if s.size is not None and s.aspect is not None:
        raise ValueError("give size or aspect, not both")
    size = s.size
    if s.aspect is not None:  # the model's preferred pixel count at this aspect ratio
        size = size_for_aspect(s.aspect, variant.default_size[0] * variant.default_size[1])
    init = None
    if s.image is not None:  # the start image sets the size (grown by an expansion) unless one is given
        init = build_init(s.image, s.mask, s.strength, s.expand, s.mask_blur, size,
                          (variant.min_side, variant.max_side, variant.id))  # fmt: skip
        size = init.image.size
    from_ref = size is None and bool(prepared)
    if size is None:  # the first reference sets the size, as in diffusers' pipelines, within the model's sides
        size = fitted(prepared[0].size, (), variant.max_side) if prepared else variant.default_size
    width, height = size
    try:
        check_size(width, height, variant.min_side, variant.max_side, variant.id)
    except ValueError as e:
        if not from_ref:
            raise
        w, h = prepared[0].size
        raise ValueError(f"{e}: the size was taken from reference 0 ({w}x{h}): give size=") from None

    seeds = _seeds(s.seed, s.seeds, len(prompts) * num_images)
    upsampling = resolve_upsampling(variant, s.prompt_upsampling)
    per_image = tuple(p for p in prompts for _ in range(num_images))
    return Request(
        prompts=per_image,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        seeds=tuple(seeds),
        refs=prepared,
        guidance_interval=(lo, hi),
        prompt_upsampling=upsampling,
        texts=tuple(map(_upsample, per_image, seeds)) if upsampling else per_image,
        init=init,
    )


def check_callback(callback: Any) -> None:
    """A step callback takes (step, steps, x0 or None) (`sampling.StepCallback`): one that cannot was called after
    the first step, failing with Python's own message."""
    if callback is None:
        return
    if not callable(callback):
        raise ValueError(f"callback must be a function of (step, steps, x0), got {type(callback).__name__}")
    try:
        inspect.signature(callback).bind(0, 1, None)
    except ValueError:  # no signature to read (some builtins): called as it is
        return
    except TypeError:
        raise ValueError(f"callback {getattr(callback, '__name__', callback)!r} must take three arguments "
                         "(step, steps, x0 or None)") from None  # fmt: skip


def whole(value: object) -> bool:
    """An int and not a bool (True is an int to Python, not a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def plain(value: Any) -> Any:
    """numpy's and torch's scalars and arrays as Python's (np.int64 seeds drawn with np.random, an np.float32
    strength, a size array), sequences as tuples; anything else as given (checked where it is used)."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.ndim == 0):
        return value.item()
    if isinstance(value, np.ndarray | list | tuple | range):
        return tuple(map(plain, value.tolist() if isinstance(value, np.ndarray) else value))
    return value


def with_seeds_counted(s: GenerationSettings) -> GenerationSettings:
    """`seeds=[...]` for one prompt without `num_images`: one image per seed (it was an error, "3 seeds given for
    1 images")."""
    if s.seeds is not None and s.num_images == 1 and len(s.prompts) == 1 and isinstance(s.seeds, Sequence):
        return s.replace(num_images=max(1, len(s.seeds)))
    return s


# what numpy or torch values may be given for (`plain`)
PLAIN_FIELDS = ("seed", "steps", "num_images", "mask_blur", "guidance", "strength", "prompt_upsampling", "seeds",
                "size", "expand")  # fmt: skip


def opened_settings(s: GenerationSettings) -> GenerationSettings:
    """`s` with image paths opened (refs, image, mask may be PIL images or files) and a "WIDTHxHEIGHT" size
    parsed; anything else there is a clear error."""

    def image(value: Any, what: str) -> Image.Image:
        if isinstance(value, str | os.PathLike):
            return open_image(value, what)
        if isinstance(value, np.ndarray):  # (Gradio's and OpenCV's images)
            if value.dtype != np.uint8 or not (value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (3, 4))):
                raise ValueError(f"{what}: an array must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4) (RGB), got "
                                 f"{value.dtype} {value.shape}")  # fmt: skip
            return Image.fromarray(value)
        if not isinstance(value, Image.Image):
            raise ValueError(f"{what} must be a PIL image, an image file's path or a uint8 array, got "
                             f"{type(value).__name__}")  # fmt: skip
        try:
            value.load()  # (a lazily read image whose file was closed failed later, without saying which)
        except Exception as e:  # (Pillow: ValueError, OSError, or a bare AssertionError once its file is closed)
            cause = str(e) or "its file was closed before its pixels were read"
            raise ValueError(f"{what} cannot be read: {cause}") from None
        return value

    if s.refs is None or isinstance(s.refs, str | os.PathLike | Image.Image | np.ndarray | bytes):
        raise ValueError("refs must be a list of images (refs=[image, ...])")
    fields: dict[str, Any] = {"refs": tuple(image(r, f"reference {i}") for i, r in enumerate(s.refs))}
    for key in PLAIN_FIELDS:
        fields[key] = plain(getattr(s, key))
    if fields["expand"] is not None and not isinstance(fields["expand"], tuple):
        raise ValueError(f"expand {s.expand!r} is not 4 sides in pixels (left, top, right, bottom)")
    for key, what in (("image", "start image"), ("mask", "mask")):
        if getattr(s, key) is not None:
            fields[key] = image(getattr(s, key), what)
    if isinstance(s.size, str):
        fields["size"] = parse_size(s.size)
    elif (size := fields["size"]) is not None and not (isinstance(size, tuple) and len(size) == 2
                                                       and all(map(whole, size))):  # fmt: skip
        raise ValueError(f"size {s.size!r} is not (width, height) in pixels or 'WIDTHxHEIGHT'")
    return s.replace(**fields)


def _references(
    variant: Variant,
    refs: Sequence[Image.Image],
    image: Image.Image | None,
    mask: Image.Image | None,
    strength: float | None,
    expand: Sequence[int] | None,
    mask_blur: int,
) -> tuple[Image.Image, ...]:
    """The references prepared, with room left for an inpainted start image where it is the first reference."""
    if image is None and (mask is not None or strength is not None or expand is not None or mask_blur):
        raise ValueError("mask, strength, expand and mask_blur edit a start image: give image= too")
    masked = image is not None and (mask is not None or bool(expand and any(expand)))
    room = reference_room(variant, masked)
    if len(refs) > room:
        raise ValueError(f"{len(refs)} reference images given; {variant.id} takes 0..{room}"
                         + (" besides the image being inpainted" if masked else ""))  # fmt: skip
    return tuple(prepare_reference(img, i) for i, img in enumerate(refs))


def reference_room(variant: Variant, inpainting: bool) -> int:
    """How many references a request may add: an inpainted start image is the first one where the model
    takes it as one (`Variant.inpaint_reference`)."""
    return variant.max_refs - (inpainting and variant.inpaint_reference)


def _seeds(seed: int, seeds: Sequence[int] | None, n: int) -> list[int]:
    """One seed per image: `seed + i`, or the `seeds` given (as many as images, each in 0..2**63-1)."""
    if seeds is None:
        if not whole(seed) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in 0..2**63-1, got {seed!r}")
        if seed + n > 2**63:
            raise ValueError(f"seed {seed} with {n} images runs past 2**63-1 (image i uses seed + i)")
        seeds = [seed + i for i in range(n)]
    elif len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds given for {n} images: give one per image")
    for s in seeds:
        if not whole(s) or not 0 <= s < 2**63:
            raise ValueError(f"seed must be an integer in 0..2**63-1, got {s!r}")
    return list(seeds)


def _guidance(
    variant: Variant,
    guidance: float | None,
    negative_prompt: str | None,
    guidance_interval: tuple[float, float] | None,
) -> tuple[float, str | None, tuple[float, float]]:
    """The guidance scale, negative prompt and guided interval a variant runs with; an error for any of them
    given to a model that does not use it."""
    if variant.guidance_mode == "none":
        if guidance is not None and guidance != 1.0:
            raise ValueError(
                f"{variant.id} is guidance-distilled and ignores guidance: omit it (got {guidance}); "
                "use a Base variant for real CFG"
            )
        guidance = 1.0
    else:
        guidance = variant.guidance if guidance is None else float(guidance)
        lo, hi = GUIDANCE_RANGE
        if not lo <= guidance <= hi:
            raise ValueError(f"guidance {guidance} is out of range {lo}..{hi}")
    if negative_prompt is not None and not variant.uses_cfg:
        raise ValueError(
            f"{variant.id} does not run classifier-free guidance, so a negative prompt has no effect: omit it"
        )
    if variant.uses_cfg and negative_prompt and guidance <= 1.0:  # no CFG at scales up to 1: the prompt alone
        raise ValueError(f"a negative prompt acts only with guidance above 1 ({variant.id} got {guidance}): raise "
                         "guidance or omit the negative prompt")  # fmt: skip
    if variant.uses_cfg and negative_prompt is None:
        negative_prompt = ""  # FLUX.2 Base: empty negative prompt by default (FLUX2.md §6)
    if guidance_interval is not None and not variant.uses_cfg:
        raise ValueError(f"{variant.id} does not run classifier-free guidance, so a guidance interval has no effect")
    lo, hi = variant.guidance_interval if guidance_interval is None else _interval(guidance_interval)
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"guidance interval ({lo}, {hi}) must be noise levels with 0 <= low < high <= 1")
    return guidance, negative_prompt, (lo, hi)


def resolve_upsampling(variant: Variant, prompt_upsampling: bool | None) -> bool:
    """Whether prompts get upsampled: the model's default (on where it has an upsampler) unless given;
    asking a model with none is an error."""
    if prompt_upsampling and variant.upsampler is None:
        raise ValueError(f"{variant.id} has no prompt upsampler (the nano models have one): omit prompt_upsampling")
    return variant.upsampler is not None if prompt_upsampling is None else bool(prompt_upsampling)


def _upsample(prompt: str, seed: int) -> str:
    from .nano.planner import upsample  # the only upsampler so far: nano's (`Variant.upsampler` "shapes")

    return upsample(prompt, seed)


def _interval(value: object) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"guidance interval {value!r} is not two noise levels (low, high), e.g. (0.0, 0.9)") from None
    return lo, hi


def check_vae_tile(tile: int | None) -> int | None:
    """A VAE tile side as given (pixels), or a ValueError naming it and the allowed values."""
    if tile is not None and (not isinstance(tile, int) or isinstance(tile, bool) or tile not in VAE_TILES):
        raise ValueError(f"VAE tile {tile!r}: give a multiple of {VAE_TILES.step} pixels from {VAE_TILES.start} to "
                         f"{VAE_TILES.stop - 1}")  # fmt: skip
    return tile


def allow_split_projection(model: Flux2Transformer) -> None:
    """Let each single-stream block compute its fused input projection's rows apart at inference (qkv for every
    token, then the MLP rows a chunk of tokens at a time: the same numbers, less memory) where that layer is a
    plain nn.Linear with nothing around it: no LoRA hook, no packed weight, no widening hook."""
    for block in model.single_blocks:
        block.split_linear1 = _plain_linear(block.linear1)


@functools.lru_cache(maxsize=8)
def _unloaded_vae_bytes(cfg: AutoencoderConfig, dtype: torch.dtype) -> int:
    """The bytes of a VAE of `cfg` in `dtype` (a skeleton on the meta device, built once per shape)."""
    with torch.device("meta"):
        return module_bytes(AutoEncoder(cfg), dtype)


def _plain_linear(lin: torch.nn.Module) -> bool:
    return type(lin) is torch.nn.Linear and not (lin._forward_hooks or lin._forward_pre_hooks)


def compile_blocks(model: Flux2Transformer) -> None:
    """`torch.compile` each double and single block in place (regional compilation, as diffusers'
    `compile_repeated_blocks`: the blocks of one kind share their compiled code, so the first call compiles two
    graphs, not a whole model's). Compiling happens during the first call; later calls of the same shapes reuse it.
    int8 layers keep their kernel there (oneDNN's prepacked one where resident, as the opaque op
    `prepacked_int8_mm`; otherwise `torch._int_mm` or `onednn_int8_mm`, as `int8_kernel` says) with the
    activations' quantization and the scaling fused."""
    constant_when_compiled()
    _inductor_cache_per_isa()
    for block in (*model.double_blocks, *model.single_blocks):
        block.compile()
    model.compiled = True


def _inductor_cache_per_isa() -> None:
    """One Inductor cache folder per PyTorch CPU capability ("AVX512", "AVX2"...). Its on-disk cache keys leave the
    capability out, so CPU code compiled in a process capped at AVX2 (`ATEN_CPU_CAPABILITY=avx2`, as to test an
    AVX2 machine on a newer one) and loaded in an uncapped one, or the reverse, gave black images (NaN) and a crash
    (`free(): invalid pointer`) here."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    isa = torch.backends.cpu.get_cpu_capability()
    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    if Path(base).name != isa:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(base) / isa)


class Component(Generic[T]):
    """A model part loaded on first use; unless `resident`, `release()` frees it until the next use.

    This is how a pipeline keeps only one large part in memory at a time: the text encoder while
    prompts are encoded, then the transformer, then the VAE (FLUX2.md §8, users' first complaint).
    """

    def __init__(self, load: Callable[[], T], resident: bool = False, files: Sequence[Path] = ()) -> None:
        self._load, self.resident, self.files = load, resident, tuple(files)
        self._value: T | None = None

    def prefetch(self) -> None:
        """Start reading this part's weight files into the page cache in the background (while another
        part computes), so that loading it later does not wait for the disk. Never blocks; no-op if loaded."""
        if self._value is None and self.files and hasattr(os, "posix_fadvise"):
            threading.Thread(target=_read_ahead, args=(self.files,), daemon=True, name="prefetch").start()

    @classmethod
    def of(cls, value: T | Component[T]) -> Component[T]:
        """Wrap an already-built part (kept resident)."""
        if isinstance(value, Component):
            return value
        c = cls(lambda: value, resident=True)
        c._value = value
        return c

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def get(self) -> T:
        if self._value is None:
            self._value = self._load()
        return self._value

    def release(self) -> None:
        if not self.resident and self._value is not None:
            self._value = None
            gc.collect()
            trim_heap()


def _read_ahead(files: Sequence[Path]) -> None:
    for path in files:
        with contextlib.suppress(OSError), open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)


class Pipeline:
    """A FLUX.2 model ready to generate: transformer, VAE and text encoder on one device and dtype.

    Parts may be given built (kept resident) or as `Component`s that load on demand and are freed
    after their phase. Components must already produce modules on `device` in `dtype`.
    """

    def __init__(
        self,
        variant: Variant,
        transformer: Flux2Transformer | Component[Flux2Transformer],
        vae: AutoEncoder | Component[AutoEncoder],
        text_encoder: TextEncoder | Component[TextEncoder],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        weights_hash: str = "",
        attention: str = "auto",
        vram_budget: int | None = None,
    ) -> None:
        if variant.vae.downscale != sampling.PIXELS_PER_TOKEN:
            raise ValueError(
                f"the VAE downsamples by {variant.vae.downscale}, FLUX.2 needs {sampling.PIXELS_PER_TOKEN}"
            )
        self.variant = variant
        self.weights_hash = weights_hash
        self.device = torch.device(device)
        self.dtype = dtype  # what computes; weights may be stored narrower (precision.widen_on_use)
        self.dtype_reason = "given"  # why this dtype; `load` sets auto's reason (precision.compute_dtype)
        self.quantize: str | None = None  # int8 / int4 / fp8 packing done at load (`load(quantize=)`), if any
        self.compile = False  # the transformer's blocks through `torch.compile` (`load(compile=True)`)
        self.use_attention(attention)
        # device bytes a phase may use, weights and work: parts are put there for their phase, blocks that do not fit
        # streamed from host memory (`device_streaming`), and brought back after it; None: parts live there
        self.vram_budget = vram_budget
        self.work: dict[str, int] = {}  # with a budget: device bytes each phase keeps for activations, this request
        self._request: Request | None = None  # the request being generated (its shapes size the work)
        self._at_once: int | None = None  # how many of its images the transformer denoises together
        self._ram: int | None = None  # on a CPU without a budget, within a call: the memory it may plan with
        self._said: set[str] = set()  # within such a call: the warnings given (the VAE's tile is planned up to 3x)
        self.planned: dict[str, int] = {}  # device bytes each phase was planned to use at most, weights and work
        self.vae_tile: int | None = None  # the VAE in tiles of this many pixels for larger images (`load(vae_tile=)`)
        self._tiled: int | None = None  # the VAE tile of the last call, if it tiled an image (in the metadata)
        self._busy = threading.RLock()  # calls from several threads take turns: a call's state is the pipeline's
        for part in (transformer, vae):
            if isinstance(part, torch.nn.Module):
                part.to("cpu" if vram_budget else self.device, dtype).eval()
        self.parts = {
            "transformer": Component.of(transformer),
            "vae": Component.of(vae),
            "text_encoder": Component.of(text_encoder),
        }
        self.loras: list[tuple[LoraFile, float, str]] = []  # (parsed file, scale, short hash)
        self._lora_state: tuple[Flux2Transformer, Applied] | None = None
        # recent prompts' embeddings and images' latents, not computed again (`.limit = 0`: none kept)
        self.prompt_cache, self.latent_cache = TensorCache(PROMPT_CACHE_BYTES), TensorCache(LATENT_CACHE_BYTES)

    def use_device(self, device: torch.device | str, vram_budget: int, attention: str = "auto") -> None:
        """Run on `device` using at most `vram_budget` bytes there per phase, weights and work memory (parts built
        on the host; `_placed` puts each on the device for its phase)."""
        self.device, self.vram_budget = torch.device(device), vram_budget
        self.use_attention(attention)

    def use_attention(self, attention: str) -> None:
        """The attention to run: "auto" (our bf16 CPU kernel where it runs, kernels/attention.py; else PyTorch's
        SDPA), "sdpa" or "kernel"."""
        self.sdpa = attention_for(attention, self.device, self.dtype, cache_dir())
        self.attention = "sdpa" if self.sdpa is F.scaled_dot_product_attention else "kernel"

    def __repr__(self) -> str:
        loras = f", loras={[(Path(f.path).name, s) for f, s, _ in self.loras]}" if self.loras else ""
        quantize = f", quantize={self.quantize!r}" if self.quantize else ""
        resident = all(part.resident for part in self.parts.values())
        return (f"Pipeline({self.variant.id}, device={self.device}, dtype={str(self.dtype).removeprefix('torch.')}"
                f"{quantize}, attention={self.attention}, resident={resident}{loras})")  # fmt: skip

    @property
    def transformer(self) -> Flux2Transformer:
        model = self.parts["transformer"].get()
        model.sdpa = self.sdpa
        if self.loras and (self._lora_state is None or self._lora_state[0] is not model):
            # fused into this (possibly freshly loaded) transformer; removed exactly by set_loras
            loras = [(f, s) for f, s, _ in self.loras]
            self._lora_state = (model, apply_loras(model, loras, mode="fuse", into=self.dtype))
        allow_split_projection(model)
        if self.compile and not model.compiled:
            compile_blocks(model)
        if self.vram_budget is not None and self._request is not None:  # exact now that the blocks are known
            self.work["transformer"] = self._transformer_work(self._request, self._at_once)
        return self._placed(model, [*model.double_blocks, *model.single_blocks], "transformer")

    def _placed(self, model: M, blocks: Sequence[torch.nn.Module] | None, what: str) -> M:
        """With a device budget: `model` put on the device for its phase, its `blocks` streamed as they fit in the
        budget less the phase's work memory (`self.work[what]`)."""
        if self.vram_budget is not None and getattr(model, "block_streamer", None) is None:
            work, name = self.work.get(what, 0), f"{self.variant.id}'s {what}"
            smaller = "fewer prompts at once" if what == "text encoder" else "a smaller image"
            if blocks is None:  # runs whole (the VAE)
                check_whole(module_bytes(model), work, self.vram_budget, name, smaller)
                model.to(self.device)
                self.planned[what] = module_bytes(model) + work
            else:
                stop_streaming_weights(blocks)  # the weights leave their file pages
                if what == "transformer" and self._request is not None:
                    name += self._at(self._request, self._at_once)
                streamer = stream_to_device(model, blocks, self.device, self.vram_budget, name, work=work,
                                            pin=self.device.type == "cuda", smaller=smaller)  # fmt: skip
                self.planned[what] = streamer.plan.peak + work
        return model

    @staticmethod
    def _at(req: Request, images: int | None = None) -> str:
        """ " at WxH[, N images]" for errors: `images` of the request's at once (default: all)."""
        images = images or req.batch
        return f" at {req.width}x{req.height}" + (f", {images} images" if images > 1 else "")

    def work_estimates(self, req: Request) -> dict[str, int]:
        """Device bytes the transformer and VAE phases keep for their work at this request (`work_memory`): one
        denoising call of the images denoised together (`_images_at_once`) with its reference tokens; the VAE
        decoding the batch or encoding the start or a reference image (in the request's tiles, if any:
        `_request_tile`), whichever needs more."""
        with self._busy, self._memory_measured():
            tile = self._request_tile(req)
            vae = [self._vae_work(1, h, w, decode=False, tile=tile) for w, h in _starts(req)]
            vae.append(self._vae_work(req.batch, req.height, req.width, tile=tile))
            return {"transformer": self._transformer_work(req, self._images_at_once(req)), "VAE": max(vae)}

    def _transformer_work(self, req: Request, images: int | None = None) -> int:
        """One denoising call's work at this request for `images` of its images at once (default: all)."""
        per = sampling.PIXELS_PER_TOKEN
        masked = req.init is not None and req.init.mask is not None and self.variant.inpaint_reference
        conditions = [*([req.init.image] if masked else []), *req.refs]
        n_ref = sum((im.height // per) * (im.width // per) for im in conditions)
        part = self.parts["transformer"]
        if part.loaded:  # the single blocks' projections computed apart (`allow_split_projection`) or whole
            split = all(_plain_linear(b.linear1) for b in part.get().single_blocks)
        else:
            split = self.quantize is None
        n_txt, n_img = self.variant.text_encoder.max_length, (req.height // per) * (req.width // per)
        return transformer_work(self.variant.transformer, self.dtype, images or req.batch, n_img, n_txt, n_ref,
                                self.variant.kv_cache, split, self._fused_attention)  # fmt: skip

    def _vae_work(self, batch: int, height: int, width: int, decode: bool = True, tile: int | None = None) -> int:
        return vae_work(self.variant.vae, self.dtype, batch, height, width, decode, tile, self._fused_attention)

    @property
    def _fused_attention(self) -> bool:
        """Whether attention runs without materialising its scores (CUDA's fused kernels; the CPU standing in for
        a device in tests runs PyTorch's flash kernel)."""
        return self.device.type in ("cuda", "cpu")

    def _check_budget(self, req: Request) -> None:
        """Before any work: refuse a request whose transformer or VAE phase cannot fit the device budget with its
        work memory, saying what would fit (the text encoder, whose shape is known once loaded, is checked as it
        is placed: it runs first). The transformer's work is for the images it denoises together (`_at_once`)."""
        self.work = {"transformer": self._transformer_work(req, self._at_once)}  # the VAE's: as it is used
        fixed, sizes = self._transformer_bytes()
        what = f"{self.variant.id}'s transformer{self._at(req, self._at_once)}"
        plan_blocks(sizes, fixed, self.vram_budget, what=what, work=self.work["transformer"])
        self._request_tile(req)  # whole or in tiles: raises if neither fits

    def _transformer_bytes(self) -> tuple[int, list[int]]:
        """The transformer's weights: (bytes outside the blocks, each block's bytes), as loaded or as stored."""
        part = self.parts["transformer"]
        if part.loaded:
            model = part.get()
            sizes = [module_bytes(b) for b in [*model.double_blocks, *model.single_blocks]]
            return module_bytes(model) - sum(sizes), sizes
        single = part.files if len(part.files) == 1 else ()  # a single weights file (GGUF, int8, fp8): as stored
        fixed, sizes, _ = transformer_sizes(self.variant.transformer, self.dtype, self.quantize, single)
        return fixed, list(sizes)

    def _room(self) -> int | None:
        """The bytes a phase may plan with, weights and work: the device budget, or on a CPU without one, within a
        call, `RAM_SHARE` of the memory the machine had available as the call began (`_memory_measured`)."""
        return self.vram_budget if self.vram_budget is not None else self._ram

    @contextlib.contextmanager
    def _memory_measured(self):
        """Around a call on a CPU without a device budget: `self._ram` measured as it begins (an outer call's stands:
        one measure, one plan, for a call's encodes, denoising and decode)."""
        if self._ram is not None or self.vram_budget is not None or self.device.type != "cpu":
            yield
            return
        available = available_ram()
        self._ram = None if available is None else int(available * RAM_SHARE)
        try:
            yield
        finally:
            self._ram = None
            self._said.clear()

    def _images_at_once(self, req: Request) -> int:
        """How many of the request's images the transformer denoises together: all, or where their work and the
        weights it holds at once (the part outside the blocks and two blocks, as streaming holds them) exceed the
        room (`_room`), as many as fit, at least one (a device budget too small for one is refused by
        `_check_budget`). Exact either way: an image's numbers do not depend on its batch."""
        room = self._room()
        if room is None or req.batch == 1:
            return req.batch
        held = least_held(*self._transformer_bytes())
        return _most(req.batch, lambda images: held + self._transformer_work(req, images) <= room)

    def _prompts_at_once(self, count: int) -> int:
        """How many of `count` distinct prompts the text encoder encodes together: all, or where their work (the
        stacked layers' hidden states are kept) and the weights it holds at once (the part outside its layers and two
        layers) exceed the room (`_room`), as many as fit, at least one (the same embeddings either way)."""
        room = self._room()
        if room is None or count == 1:
            return count
        model = getattr(self.parts["text_encoder"].get(), "model", None)
        if not isinstance(model, torch.nn.Module):
            return count
        sizes = [module_bytes(layer) for layer in getattr(model, "layers", [])]
        held = least_held(module_bytes(model) - sum(sizes), sizes)
        spec = self.variant.text_encoder
        return _most(count, lambda k: held + text_encoder_work(model.config, self.dtype, k, spec) <= room)

    def _vae_bytes(self) -> int:
        vae = self.parts["vae"]
        return module_bytes(vae.get()) if vae.loaded else _unloaded_vae_bytes(self.variant.vae, self.dtype)

    def _request_tile(self, req: Request) -> int | None:
        """The tile side (pixels) the VAE encodes the request's start and reference images and decodes its images
        in, one for all (`_vae_tile`)."""
        return self._vae_tile(req.batch, req.height, req.width, _starts(req))

    def _vae_tile(self, batch: int, height: int, width: int, starts: Sequence[tuple[int, int]] = ()) -> int | None:
        """The tile side (pixels) the VAE decodes `batch` images of this size and encodes images of the `starts`
        sizes (width, height) in, None for whole: `vae_tile`; where there is a room (`_room`: a device budget, or a
        CPU's available memory), the first of it (or whole) and AUTO_TILES below it where each of these fits beside
        the VAE's weights. When no tile does: under a budget, a ValueError naming the one that needs most; on a CPU,
        the smallest tile (the machine may still have swap). On a CPU without a budget, whole images that fit by a
        bound of their work (`vae_work_bound`) are not traced."""
        room = self._room()
        if room is None:
            return self.vae_tile
        weights = self._vae_bytes()
        whole = [(batch, height, width), *((1, h, w) for w, h in starts)]
        if self.vram_budget is None and all(self.vae_tile is None or max(h, w) <= self.vae_tile for _, h, w in whole):
            bound = max(vae_work_bound(self.variant.vae, self.dtype, *s, self._fused_attention) for s in whole)
            if weights + bound <= room:  # whole images fit by a bound of their work: no trace needed
                return self.vae_tile
        tries = [self.vae_tile, *(t for t in AUTO_TILES if self.vae_tile is None or t < self.vae_tile)]
        decoding = f"decoding {width}x{height}" + (f", {batch} images" if batch > 1 else "")
        for tile in tries:
            needs = [(self._vae_work(batch, height, width, tile=tile), decoding, max(height, width))]
            needs += [(self._vae_work(1, h, w, decode=False, tile=tile), f"encoding a {w}x{h} image", max(w, h))
                      for w, h in starts]  # fmt: skip
            work, what, side = max(needs, key=lambda need: need[0])
            if weights + work <= room:
                return tile
        if self.vram_budget is None:
            said = (f"{self.variant.id}'s VAE {what} needs about {human(weights + work)} even in {tries[-1]}-pixel "
                    f"tiles; this machine has {human(room / RAM_SHARE)} available")  # fmt: skip
            if said not in self._said:  # once a call
                log.warning(said)
                self._said.add(said)
            return tries[-1]
        need, smaller = human(weights + work), "batch" if what.startswith("decoding") and batch > 1 else "image"
        tiled = f"even in {tries[-1]}-pixel tiles " if tries[-1] is not None and side > tries[-1] else ""
        raise ValueError(
            f"a device budget of {human(self.vram_budget)} is too small for {self.variant.id}'s VAE {what}: {tiled}"
            f"it needs {need} ({human(weights)} of weights and about {human(work)} of work memory); give --vram "
            f"{need} or more, or a smaller {smaller}"
        )

    def set_loras(self, loras: Sequence[tuple[str | Path, float] | str | Path]) -> None:
        """Use these LoRA files with these scales from the next call on ([] removes them, exactly); a path alone
        has scale 1. Files are read first: one that cannot be used changes nothing; a call under way finishes with
        the LoRAs it began with."""
        if isinstance(loras, str | os.PathLike) or (isinstance(loras, tuple) and len(loras) == 2
                                                    and isinstance(loras[1], int | float)):  # fmt: skip
            raise ValueError(f"loras must be a list of files or (file, scale) pairs: set_loras([{loras!r}])")
        pairs = [(item, 1.0) if isinstance(item, str | os.PathLike) else item for item in loras]
        if not all(isinstance(p, tuple | list) and len(p) == 2 for p in pairs):
            raise ValueError(f"loras must be a list of files or (file, scale) pairs, got {list(loras)!r}")
        with torch.device("meta"):  # names and shapes only: parse without touching the real weights
            skeleton = Flux2Transformer(self.variant.transformer)
        loras = [(path, check_scale(scale, path)) for path, scale in pairs]  # before any file is read
        parsed = [(load_lora(path, skeleton), scale, weights_hash([Path(path)])) for path, scale in loras]
        with self._busy:
            if self._lora_state is not None:
                model, applied = self._lora_state
                if self.parts["transformer"].loaded and self.parts["transformer"].get() is model:
                    applied.remove()
                self._lora_state = None
            self.loras = parsed

    @property
    def vae(self) -> AutoEncoder:
        model = self._placed(self.parts["vae"].get(), None, "VAE")
        model.set_attention(self.sdpa)
        return model

    @property
    def text_encoder(self) -> TextEncoder:
        encoder = self.parts["text_encoder"].get()
        if isinstance(model := getattr(encoder, "model", None), torch.nn.Module):
            self._placed(model, getattr(model, "layers", None), "text encoder")  # MiniLM (nano): runs whole
        return encoder

    def release(self, *names: str) -> None:
        """The end of these parts' phase: freed unless resident; with a device budget, off the device either way."""
        for name in names:
            part = self.parts[name]
            if name == "transformer" and not part.resident:  # its LoRA state held the model: it was never freed,
                self._lora_state = None  # and the next call loaded a second copy beside it (applied anew then)
            if self.vram_budget is not None and part.loaded:
                value = part.get()
                to_host(value.model if isinstance(value, TextEncoder) else value)
            part.release()

    def check(self, prompt: str | Sequence[str] | GenerationSettings, **fields: Any) -> list[int]:
        """The call's checks alone (a ValueError naming the value and its range), nothing run: a list of jobs is
        checked whole before its first image. Returns the seed of each image the call would make."""
        return list(build_request(self.variant, prompt, **fields).seeds)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | GenerationSettings,
        *,
        callback: sampling.StepCallback | None = None,
        **fields: Any,
    ) -> list[Image.Image]:
        """Generate `num_images` images per prompt; image i uses seed `seed + i` (or `seeds[i]`). `fields` are
        `GenerationSettings`'s (or pass one, with fields that change it); `build_request` checks them.

        CFG models: `guidance_interval=(lo, hi)` guides only the noise levels in [lo, hi] (default: the model's).
        Models with an upsampler (nano): `prompt_upsampling=False` encodes the prompts exactly as given.
        Editing: `image=` start image (image-to-image with `strength`), `mask=` (white = repaint) to inpaint,
        `expand=(left, top, right, bottom)` px to outpaint.
        """
        req = build_request(self.variant, prompt, **fields)  # bad input refused at once, without waiting a turn
        check_callback(callback)
        with self._busy, self._memory_measured():
            try:
                latents = self.generate_latents(req, callback)
                tile = self._request_tile(req)  # the VAE encoded and decodes the request's images in these tiles
                if tile != self.vae_tile and self.vram_budget is None:
                    log.info("%s: the VAE works in %d-pixel tiles: whole it needs more than the %s available",
                             self.variant.id, tile, human(self._ram / RAM_SHARE))  # fmt: skip
                images = to_pil(self.decode(latents, tile=tile))
            except BaseException:  # a callback that cancels (raises), an error: the phase's part is not kept
                self.release(*self.parts)
                raise
            tiled = tile is not None and max(req.width, req.height, *map(max, _starts(req))) > tile
            self._tiled = tile if tiled else None
            if req.init is not None and req.init.paste_back:  # outpainting: the original pixels, unchanged
                images = [paste_kept(im, req.init.image, req.init.mask) for im in images]
            for i, out in enumerate(images):
                meta = self.metadata(req, i)
                out.info["flux2"] = json.dumps(meta)
                out.info["parameters"] = parameters_text(meta)
        return images

    def metadata(self, req: Request, i: int) -> dict:
        """Everything needed to make image i again: settings, model and weights, references, version."""
        return {
            "prompt": req.prompts[i],
            "negative_prompt": req.negative_prompt,
            "model": self.variant.id,
            "weights_hash": self.weights_hash,
            "seed": req.seeds[i],
            "steps": req.steps,
            "guidance": req.guidance,
            **({"guidance_interval": list(req.guidance_interval)} if self.variant.uses_cfg else {}),
            **({"prompt_upsampling": req.prompt_upsampling} if self.variant.upsampler else {}),
            **({"upsampled_prompt": req.texts[i]} if req.prompt_upsampling else {}),
            "width": req.width,
            "height": req.height,
            "refs": [image_hash(r) for r in req.refs],
            **({"init": req.init.metadata()} if req.init is not None else {}),
            **({"vae_tile": self._tiled} if self._tiled else {}),  # tiles change the pixels near their seams
            **self.setup(),
        }

    def setup(self) -> dict:
        """How this pipeline computes, beyond the settings of a call: dtype (and why), quantization, device,
        attention, LoRAs, version (in each image's metadata and in an eval's result)."""
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "dtype_reason": self.dtype_reason,
            **({"quantize": self.quantize} if self.quantize else {}),
            "device": self.device.type,
            "attention": self.attention,
            "loras": [{"file": Path(f.path).name, "hash": h, "scale": s} for f, s, h in self.loras],
            "version": __version__,
        }

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """(B, L, C) text embeddings in the pipeline dtype: those of prompts seen in recent calls from `prompt_cache`
        (the text encoder is not even loaded when all were), the others encoded, identical ones once."""
        with self._busy, self._memory_measured():  # a call's turn (threads) and its one measure of memory
            unique = dict.fromkeys(prompts)
            got = {
                p: kept.to(self.device) for p in unique if (kept := self.prompt_cache.get((p, self.dtype))) is not None
            }
            new = [p for p in unique if p not in got]
            if new:
                for p, emb in zip(new, self._encode(new), strict=True):
                    got[p] = emb
                    self.prompt_cache.put((p, self.dtype), emb)
            return torch.stack([got[p] for p in prompts])

    def _encode(self, unique: list[str]) -> Tensor:
        """Distinct prompts through the text encoder, as many at once as fit (`_prompts_at_once`)."""
        at_once = self._prompts_at_once(len(unique))
        if self.vram_budget is not None:  # its work memory, known from its config once loaded
            config = self.parts["text_encoder"].get().model.config
            self.work["text encoder"] = text_encoder_work(config, self.dtype, at_once, self.variant.text_encoder)
        encoder = self.text_encoder
        with self._computing(getattr(encoder, "model", None)):
            parts = [unique[i : i + at_once] for i in range(0, len(unique), at_once)]
            return torch.cat([encoder(part, dtype=self.dtype).to(self.device) for part in parts])

    def _computing(self, model: torch.nn.Module | None) -> contextlib.AbstractContextManager:
        """Around a model's computation on the CPU: memory reused between its layers and steps, the heap held where
        it multiplies in int8 (`residency.reuse_freed_memory`)."""
        if self.device.type != "cpu":
            return contextlib.nullcontext()
        return reuse_freed_memory(hold_heap=isinstance(model, torch.nn.Module) and multiplies_int8(model))

    def encode_image(self, image: Image.Image, tile: int | None = None) -> Tensor:
        """An RGB image -> normalised latents (1, 128, H/16, W/16), in `tile`-pixel tiles if larger than one; those
        of an image encoded in a recent call from `latent_cache` (the VAE not loaded for it)."""
        key = (pixels_digest(image), tile if tile is not None and max(image.size) > tile else None, self.dtype)
        if (kept := self.latent_cache.get(key)) is not None:
            return kept.to(self.device)
        if self.vram_budget is not None:
            self.work["VAE"] = self._vae_work(1, image.height, image.width, decode=False, tile=tile)
        latents = self.vae.encode(to_tensor(image).to(self.device, self.dtype), tile=tile)
        self.latent_cache.put(key, latents)
        return latents

    @staticmethod
    def _reference_tokens(latents: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        tokens = torch.cat([sampling.pack(z) for z in latents], dim=1)
        return tokens, sampling.reference_ids([tuple(z.shape[-2:]) for z in latents])

    def generate_latents(self, req: Request, callback: sampling.StepCallback | None = None) -> Tensor:
        """Run the flow for a validated request; returns normalised latents (B, 128, H/16, W/16)."""
        with self._busy, self._memory_measured():
            self._request, self.planned = req, {}
            self._at_once = self._images_at_once(req)
            try:
                if self.vram_budget is not None:
                    self._check_budget(req)
                elif self._at_once < req.batch:
                    log.info("%s: %d images at %dx%d need more than the %s this machine has available at once: "
                             "denoising %d at a time (the same images)", self.variant.id, req.batch, req.width,
                             req.height, human(self._ram / RAM_SHARE), self._at_once)  # fmt: skip
                return self._generate_latents(req, callback)
            finally:
                self._request = self._at_once = None  # later uses of the parts size no work from this request

    def _generate_latents(self, req: Request, callback: sampling.StepCallback | None) -> Tensor:
        h, w = req.height // sampling.PIXELS_PER_TOKEN, req.width // sampling.PIXELS_PER_TOKEN
        self.parts["transformer"].prefetch()  # read from disk while the text encoder computes
        txt = self.encode_prompts(req.texts)
        negative = None
        if self.variant.uses_cfg and req.guidance > 1.0:
            negative = self.encode_prompts([req.negative_prompt] * req.batch)
        self.release("text_encoder")  # phase 1 done: prompts are embeddings now
        txt_ids = sampling.text_ids(txt.shape[1]).to(self.device)
        x = sampling.pack(
            sampling.noise(req.seeds, self.variant.transformer.in_channels, req.height, req.width, self.dtype)
        )
        x = x.to(self.device)
        img_ids = sampling.image_ids(h, w).to(self.device)
        n_img = x.shape[1]
        guidance = None
        if self.variant.guidance_mode == "embedded":
            guidance = torch.full((1,), req.guidance, device=self.device, dtype=torch.float32)  # the batch's
        start, ref_tokens, ref_ids, ref_kv = self._conditions(req, guidance)

        def model(context: Tensor) -> sampling.Velocity:
            transformer = self.transformer  # once, not per step (the property applies LoRAs and placement)

            def velocity(x: Tensor, t: Tensor) -> Tensor:
                if ref_tokens is None or ref_kv is not None:
                    return transformer(x, img_ids, context, txt_ids, t, guidance, ref_kv)
                joint = torch.cat([x, ref_tokens.expand(x.shape[0], -1, -1)], dim=1)
                ids = torch.cat([img_ids, ref_ids])
                return transformer(joint, ids, context, txt_ids, t, guidance)[:, :n_img]

            return velocity

        def velocity_of(images: slice) -> sampling.Velocity:  # the velocity of these images of the batch
            velocity = model(txt[images])
            if negative is None:
                return velocity
            return sampling.cfg_velocity(velocity, model(negative[images]), req.guidance, req.guidance_interval)

        self.parts["vae"].prefetch()
        sigmas = sampling.schedule(req.steps, n_img, self.variant.mu).to(self.device)
        inpaint = None
        if req.init is not None:  # the full schedule from the strength's first step, its noise on the start
            sigmas = sigmas[sampling.start_index(req.steps, req.init.strength) :]
            clean, noise = sampling.pack(start).expand(req.batch, -1, -1), x
            x = sampling.add_noise(clean, noise, sigmas[0])
            if req.init.mask is not None:
                inpaint = sampling.Inpaint(clean, noise, sampling.mask_tokens(req.init.mask, h, w).to(self.device))
        with self._computing(self.parts["transformer"].get()):
            x = self._denoise(velocity_of, x, sigmas, callback, inpaint)
        self.release("transformer")
        return sampling.unpack(x, h, w)

    def _conditions(self, req: Request, guidance: Tensor | None) -> tuple[Tensor | None, ...]:
        """The VAE's part of a request before the denoising: the start image's latents (image-to-image,
        inpainting), and the reference tokens (B=1: one copy for the batch), their ids and, for a KV-cached model,
        their keys and values; None where there are none."""
        start = None  # image-to-image / inpainting: the start image's latents, and the first reference if masked
        conditions = []
        tile = self._request_tile(req) if _starts(req) else None
        if req.init is not None:
            start = self.encode_image(req.init.image, tile)
            if req.init.mask is not None and self.variant.inpaint_reference:
                conditions.append(start)
        conditions += [self.encode_image(r, tile) for r in req.refs]
        if start is not None or conditions:
            self.release("vae")
        if not conditions:
            return start, None, None, None
        ref_tokens, ref_ids = self._reference_tokens(conditions)
        ref_ids, ref_kv = ref_ids.to(self.device), None
        if self.variant.kv_cache:  # reference tokens at a fixed timestep 0, computed once, one copy for the batch
            ref_kv = self.transformer.ref_kv(ref_tokens, ref_ids, torch.zeros(1, device=self.device), guidance)
        return start, ref_tokens, ref_ids, ref_kv

    def _denoise(self, velocity_of: Callable[[slice], sampling.Velocity], x: Tensor, sigmas: Tensor,
                 callback: sampling.StepCallback | None, inpaint: sampling.Inpaint | None) -> Tensor:  # fmt: skip
        """The sampler over the batch, `self._at_once` images at a time (`_images_at_once`; bit for bit the whole
        batch's). In parts, progress counts every part's steps and no step's x0 estimate is given (it would not
        cover the batch)."""
        batch, steps = x.shape[0], len(sigmas) - 1
        at_once = self._at_once or batch
        if at_once >= batch:
            return sampling.denoise(velocity_of(slice(None)), x, sigmas, callback, inpaint)
        parts = [slice(lo, lo + at_once) for lo in range(0, batch, at_once)]
        out = []
        for n, images in enumerate(parts):
            step = None if callback is None else _steps_after(callback, n * steps, len(parts) * steps)
            part_inpaint = None if inpaint is None else inpaint.of(images)
            out.append(sampling.denoise(velocity_of(images), x[images], sigmas, step, part_inpaint))
        return torch.cat(out)

    @torch.no_grad()
    def preview(self, tokens: Tensor, width: int, height: int, index: int = 0) -> Image.Image | None:
        """Image `index` of a step's x0 estimate (from the callback), decoded; None unless the VAE is
        resident (servers) and no device budget is set, so a preview never loads a model part or puts one on the
        device mid-generation."""
        if not self.parts["vae"].resident or self.vram_budget is not None:  # under a budget: not mid-phase
            return None
        h, w = height // sampling.PIXELS_PER_TOKEN, width // sampling.PIXELS_PER_TOKEN
        z = sampling.unpack(tokens[index : index + 1].to(self.device), h, w)
        return to_pil(self.vae.decode(z.to(self.dtype), tile=self.vae_tile))[0]

    def decode(self, latents: Tensor, tile: int | Literal["auto"] | None = "auto") -> Tensor:
        """Normalised latents -> images (B, 3, H, W) in [-1, 1]; in `tile`-pixel tiles if larger than one; "auto":
        in `vae_tile` tiles, or where a device budget or a CPU's available memory leaves no room for a whole decode
        (`_vae_tile`)."""
        (b, _, h, w), per = latents.shape, sampling.PIXELS_PER_TOKEN
        with self._busy, self._memory_measured():
            if tile == "auto":
                tile = self._vae_tile(b, h * per, w * per)
            if self.vram_budget is not None:
                self.work["VAE"] = self._vae_work(b, h * per, w * per, tile=tile)
            images = self.vae.decode(latents.to(self.dtype), tile=tile)
            self.release("vae")
        return images


def _most(count: int, fits: Callable[[int], bool]) -> int:
    """The largest k in 1..count with fits(k), by bisection (what k needs grows with k); 1 if none fits."""
    if fits(count):
        return count
    lo, hi = 1, count
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _steps_after(callback: sampling.StepCallback, before: int, total: int) -> sampling.StepCallback:
    """A part of the batch's step callback: its steps counted after `before` others, of `total`, with no x0."""
    return lambda i, _steps, _x0: callback(before + i, total, None)


def _starts(req: Request) -> list[tuple[int, int]]:
    """(width, height) of the images the VAE encodes for a request: its start image and its references."""
    return [im.size for im in [*([req.init.image] if req.init is not None else []), *req.refs]]
