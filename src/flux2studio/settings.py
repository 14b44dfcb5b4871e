"""One generation as asked for: the one shape the Python API, the CLI (flags, --prompts lines, --from PNGs), the
HTTP API, the job store, the worker and the hosted client share. The model's rules fill defaults and check ranges
later (`pipeline.build_request`, `hosted.check_request`); this module only names the fields and stores them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SETTINGS_VERSION = 2  # stored rows: 1 = the flat dicts written before this class (no "version" key)


@dataclass(frozen=True)
class GenerationSettings:
    """What a caller asks for; None = the model's default. Images (`refs`, `image`, `mask`) are PIL images when a
    pipeline runs them and upload ids in the job store."""

    prompt: str | Sequence[str]
    negative_prompt: str | None = None  # real-CFG models only
    size: tuple[int, int] | None = None  # (width, height); default: the start image, first reference, model's
    aspect: str | None = None  # "16:9": the model's pixel count at that ratio (instead of size)
    steps: int | None = None
    guidance: float | None = None
    guidance_interval: tuple[float, float] | None = None  # CFG models: the noise levels guided
    prompt_upsampling: bool | None = None  # models with an upsampler (nano); the API's own for flex / Kontext
    seed: int = 0  # image i: seed + i, unless `seeds` names each
    num_images: int = 1  # per prompt
    seeds: Sequence[int] | None = None
    refs: Sequence[Any] = ()  # reference images
    image: Any = None  # editing: the start image (image-to-image)
    mask: Any = None  # white = repaint (inpainting)
    strength: float | None = None  # (0, 1]: how far from the start image
    expand: Sequence[int] | None = None  # px LEFT, TOP, RIGHT, BOTTOM added (outpainting)
    mask_blur: int = 0  # px of feathering of the mask's edge

    @classmethod
    def of(cls, prompt: str | Sequence[str] | GenerationSettings, /, **fields: Any) -> GenerationSettings:
        """Settings from a prompt and fields, or given settings with some fields changed; an unknown field is a
        ValueError that lists the known ones."""
        if unknown := sorted(set(fields) - FIELDS):
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
        if isinstance(prompt, GenerationSettings):
            return dataclasses.replace(prompt, **fields)
        return cls(prompt=prompt, **fields)

    def replace(self, **fields: Any) -> GenerationSettings:
        """These settings with some fields changed (`of`'s checks)."""
        return GenerationSettings.of(self, **fields)

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt)

    @property
    def images(self) -> int:
        """How many images the call makes."""
        return len(self.prompts) * self.num_images

    def to_json(self) -> dict:
        """The stored row (images as upload ids): flat, width and height apart, versioned."""
        row = {"version": SETTINGS_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "size":
                row["width"], row["height"] = value or (None, None)
            else:
                row[f.name] = list(value) if isinstance(value, tuple | list) else value
        return row

    @classmethod
    def from_metadata(
        cls, meta: dict, refs: Sequence[Any] = (), image: Any = None, mask: Any = None
    ) -> GenerationSettings:
        """The settings an image's `flux2` metadata records (`images.read_metadata`), to make it again: give the
        same reference images, start image and mask (the metadata holds their hashes, not the images), and load
        the pipeline as it records (`model`, `dtype`, `attention`, `quantize`, `vae_tile`, LoRAs: docs/usage.md)."""
        missing = [k for k in ("prompt", "seed", "steps", "width", "height") if k not in meta]
        if missing:
            raise ValueError(f"the metadata lacks {', '.join(missing)}: not an image's flux2 metadata")
        if len(refs) != len(meta.get("refs") or []):
            raise ValueError(f"the image was made with {len(meta.get('refs') or [])} reference image(s); "
                             f"{len(refs)} given")  # fmt: skip
        fields: dict[str, Any] = {"seed": meta["seed"], "steps": meta["steps"], "refs": tuple(refs)}
        fields["size"] = (meta["width"], meta["height"])
        for key in ("negative_prompt", "guidance"):
            if meta.get(key) is not None:
                fields[key] = meta[key]
        fields["prompt_upsampling"] = meta.get("prompt_upsampling", False)  # (older images: as written, as --from)
        if meta.get("guidance_interval") is not None:
            fields["guidance_interval"] = tuple(meta["guidance_interval"])
        init = meta.get("init") or {}
        for key, given in (("image", image), ("mask", mask)):
            what = "a start image" if key == "image" else "a mask"
            if given is None and init.get(key) is not None:
                raise ValueError(f"the image was made from {what}: give it as {key}=")
            if given is not None and init.get(key) is None:
                raise ValueError(f"the image was made without {what}: omit {key}=")
        if init:
            fields.update(image=image, mask=mask, strength=init["strength"], mask_blur=init.get("mask_blur") or 0)
            if init.get("expand"):
                fields["expand"], fields["size"] = tuple(init["expand"]), None
        return cls.of(meta["prompt"], **fields)

    @classmethod
    def from_json(cls, row: dict) -> GenerationSettings:
        """A stored row of any version so far; a newer one or an unknown field is a clear error."""
        version = row.get("version", 1)
        if isinstance(version, str) and "weights_hash" in row:
            raise ValueError("this is an image's metadata, not a stored settings row: use from_metadata")
        if not isinstance(version, int) or not 1 <= version <= SETTINGS_VERSION:
            raise ValueError(f"settings version {version!r}: this flux2studio reads 1..{SETTINGS_VERSION}")
        fields = {k: v for k, v in row.items() if k not in ("version", "width", "height")}
        if row.get("width") is not None:
            fields["size"] = (row["width"], row["height"])
        for key in ("prompt", "guidance_interval", "expand", "refs", "seeds"):
            if isinstance(fields.get(key), list):
                fields[key] = tuple(fields[key])
        return cls.of(fields.pop("prompt"), **fields)


FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationSettings))
PER_IMAGE = ("prompt", "seed", "num_images", "seeds")  # what jobs sharing one pipeline call may differ in
