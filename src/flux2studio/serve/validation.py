"""Admission of work: every check a request passes before it is queued (the limits table, then the model's
own rules through `build_request`), and what the served models are. Routes reach it through `admission`."""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import HTTPException, Request
from PIL import Image

from ..editing import fitted, prepared_size
from ..hosted import ENDPOINTS, MIN_SIDE, check_request, price
from ..images import check_reference_size, open_image, size_for_aspect
from ..pipeline import build_request, reference_room
from ..settings import GenerationSettings
from ..variants import get_variant
from .limits import Limits
from .schemas import JobRequest
from .store import Store
from .worker import Worker

ORIENTATION = 0x0112  # the EXIF tag
EXIF_IN_HEADER = ("JPEG", "MPO", "WEBP")  # read without decoding (a PNG's getexif decodes the whole image)


class Admission:
    """The store, the worker and the limits, with the served models (`remote`: those run on BFL's API)."""

    def __init__(self, store: Store, worker: Worker, limits: Limits, served: list[str], remote: set[str],
                 lora_dir: str | Path | None) -> None:  # fmt: skip
        self.store, self.worker, self.limits = store, worker, limits
        self.served, self.remote, self.lora_dir = served, remote, lora_dir

    def validate(self, req: JobRequest) -> tuple[GenerationSettings, list[tuple[str, float]], int]:
        """Every check before queueing: the limits table, then the model's own rules (build_request). Returns the
        settings to store (defaults resolved, so a job runs the same whatever the defaults become; images by
        upload id), the LoRA files and the progress total."""
        req.model = self.model_or_default(req.model)
        self.check_basics(req.model, req.num_images, prompt=req.prompt, negative_prompt=req.negative_prompt)
        variant = get_variant(req.model)
        if len(req.refs) > self.limits.max_refs:
            raise HTTPException(422, f"{len(req.refs)} references; at most {self.limits.max_refs}")
        if req.steps is not None and not 1 <= req.steps <= self.limits.max_steps:
            raise HTTPException(422, f"steps {req.steps} is out of range 1..{self.limits.max_steps}")
        if req.aspect is not None and (req.width is not None or req.height is not None):  # (the aspect won)
            raise HTTPException(422, "give width and height or aspect, not both")
        if req.aspect is not None:
            try:
                req.width, req.height = size_for_aspect(req.aspect, variant.default_size[0] * variant.default_size[1])
            except ValueError as e:
                raise HTTPException(422, str(e)) from None
        local = req.model not in self.remote
        sizes = self.reference_sizes(req.refs, local)
        edit = self.editing(req)
        size = None  # an edit without a size: its start image (and expansion) sets it
        from_ref = local and not edit and sizes and req.width is None and req.height is None
        if from_ref:  # the first reference
            size = fitted(prepared_size(sizes[0]), (), min(variant.max_side, self.limits.max_side))  # sets it as
            # in the pipeline: as prepared, within the sides
        elif not edit or req.width is not None or req.height is not None:
            size = (variant.default_size[0] if req.width is None else req.width,  # 0 is a size, and out of range
                    variant.default_size[1] if req.height is None else req.height)  # fmt: skip
        if size is not None:
            self.check_area(*size)
        loras = self.loras(req.loras)
        asked = GenerationSettings(
            req.prompt, negative_prompt=req.negative_prompt, size=size, steps=req.steps, guidance=req.guidance,
            guidance_interval=req.guidance_interval, prompt_upsampling=req.prompt_upsampling,
            seed=req.seed if req.seed is not None else secrets.randbelow(2**31), num_images=req.num_images,
            refs=tuple(req.refs), strength=req.strength, expand=req.expand, mask_blur=req.mask_blur,
        )  # fmt: skip
        if req.model in self.remote:  # progress of a hosted job counts its images, not steps
            return self.hosted_rules(req, asked, loras, sizes), loras, req.num_images
        try:  # the model's own checks: multiples of 16, its size range, guidance mode, negative prompt
            built = build_request(variant, asked, refs=(), **edit)  # references: counted below, by id
        except ValueError as e:
            said = ""
            if from_ref and str(e).startswith(("width", "height")):  # (a size the request never gave)
                said = f": the size was taken from reference 0 ({sizes[0][0]}x{sizes[0][1]}): give width and height"
            raise HTTPException(422, f"{e}{said}") from None
        stored = asked.replace(
            steps=built.steps, guidance=built.guidance,
            guidance_interval=built.guidance_interval if variant.uses_cfg else None,
            prompt_upsampling=built.prompt_upsampling if variant.upsampler else req.prompt_upsampling,
        )  # fmt: skip
        if built.init is not None:
            room = reference_room(variant, built.init.mask is not None)
            if len(req.refs) > room:
                raise HTTPException(422, f"{len(req.refs)} references; {req.model} takes 0..{room} besides the "
                                         "image being inpainted")  # fmt: skip
            self.check_area(built.width, built.height)
            stored = stored.replace(size=(built.width, built.height), image=req.image, mask=req.mask,
                                    strength=built.init.strength,
                                    expand=built.init.expand if any(built.init.expand) else None)  # fmt: skip
        return stored, loras, built.steps

    def reference_sizes(self, refs: list[str], local: bool) -> list[tuple[int, int]]:
        """Each reference's size (its header only), each id known and, for a `local` model, each size one the
        pipelines take (the hosted API has rules of its own: `hosted.check_request`)."""
        sizes = []
        for i, ref in enumerate(refs):
            if (path := self.store.ref_path(ref)) is None:
                raise HTTPException(422, f"unknown reference id {ref[:64]!r}: upload it to /v1/uploads first")
            with Image.open(path) as im:  # as seen: a photo turned by its EXIF orientation has its sides swapped
                turned = im.format in EXIF_IN_HEADER and im.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8)
                size = im.size[::-1] if turned else im.size
            sizes.append(size)
            if local:
                try:
                    check_reference_size(*size, i)
                except ValueError as e:
                    raise HTTPException(422, str(e)) from None
        return sizes

    def loras(self, asked: list[tuple[str, float]]) -> list[tuple[str, float]]:
        """LoRAs by name in the server's LoRA folder, scales in range: (file, scale)."""
        if len(asked) > self.limits.max_loras:
            raise HTTPException(422, f"{len(asked)} LoRAs; at most {self.limits.max_loras}")
        loras = []
        for name, scale in asked:
            plain = len(name) <= 128 and name.isascii() and name.replace("-", "").replace("_", "").isalnum()
            path = Path(self.lora_dir or "/nonexistent") / f"{name}.safetensors"
            if not (plain and path.is_file()):  # a name, never a path (and never long enough to fail the OS)
                raise HTTPException(422, f"unknown LoRA {name[:64]!r}")
            if not abs(scale) <= self.limits.max_lora_scale:  # also refuses NaN
                most = self.limits.max_lora_scale
                raise HTTPException(422, f"LoRA {name!r} scale {scale} is out of range -{most:g}..{most:g}")
            loras.append((str(path), float(scale)))
        return loras

    def editing(self, req: JobRequest) -> dict:
        """The start image and mask opened (ids checked); {} when not an edit."""
        if req.image is None:
            if req.mask is not None or req.strength is not None or req.expand is not None or req.mask_blur:
                raise HTTPException(422, "mask, strength, expand and mask_blur edit a start image: give image")
            return {}
        if req.model in self.remote:
            raise HTTPException(422, f"{req.model} is a hosted model: editing a start image runs on local models")
        opened = {}
        for key in ("image", "mask"):
            upload = getattr(req, key)
            if upload is None:
                continue
            if (path := self.store.ref_path(upload)) is None:
                raise HTTPException(422, f"unknown {key} id {upload[:64]!r}: upload it to /v1/uploads first")
            opened[key] = open_image(path, key)
        return opened

    def check_area(self, width: int, height: int) -> None:
        for name, value in (("width", width), ("height", height)):
            if not 1 <= value <= self.limits.max_side:
                raise HTTPException(422, f"{name} {value} is out of range 1..{self.limits.max_side}")
        if width * height > self.limits.max_megapixels * 1e6:
            raise HTTPException(422, f"{width}x{height} is over {self.limits.max_megapixels} megapixels")

    def model_or_default(self, model: str | None) -> str:
        """The model a request names, else nano where it is served, else the first model served (a server of klein
        alone answered a request without a model "nano is not served here")."""
        if model is not None:
            return model
        return "nano" if "nano" in self.served else self.served[0]

    def check_basics(self, model: str, num_images: int, count: str = "num_images", **texts: str | None) -> None:
        """What needs no model and no image: the model is served, the count (the field `count`) and the texts
        are in range."""
        if model not in self.served:
            raise HTTPException(422, f"model {model[:64]!r} is not served here; served: {', '.join(self.served)}")
        if not 1 <= num_images <= self.limits.max_images:
            raise HTTPException(422, f"{count} {num_images} is out of range 1..{self.limits.max_images}")
        for name, text in texts.items():
            if (problem := self.limits.text_problem(name, text)) is not None:
                raise HTTPException(422, problem)

    def hosted_rules(self, req: JobRequest, asked: GenerationSettings, loras: list,
                     sizes: list[tuple[int, int]]) -> GenerationSettings:  # fmt: skip
        """The hosted endpoint's own rules (no LoRAs, steps and guidance only for flex, 32-bit seeds, no editing);
        `sizes`: the references'."""
        if loras:
            raise HTTPException(422, f"{req.model} runs on the hosted API, which takes no LoRA files")
        if req.seed is not None and req.seed >= 2**32:
            raise HTTPException(422, f"seed {req.seed} is out of range 0..2**32-1 for hosted models")
        try:
            resolved, _ = check_request(ENDPOINTS[req.model], asked, sizes)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return asked.replace(steps=resolved.steps, guidance=resolved.guidance)

    def submit(self, req: JobRequest):
        settings, loras, steps = self.validate(req)
        if self.limits.keep_finished_s is not None:
            self.store.expire_jobs(self.limits.keep_finished_s)
        if (problem := self.limits.disk_problem(self.store.disk_bytes)) is not None:
            raise HTTPException(507, problem)
        if self.store.count("queued", "running") >= self.limits.max_queue:
            raise HTTPException(
                429, f"queue full ({self.limits.max_queue} jobs); retry later", headers={"Retry-After": "10"}
            )
        job = self.store.add(req.model, settings, steps, loras)
        self.worker.notify()
        return job

    def model_row(self, model_id: str, keyed: bool) -> dict:
        """What /v1/models says of one served model (OpenAI's fields first, then ours)."""
        v = get_variant(model_id)
        row = {"id": v.id, "object": "model", "owned_by": "flux2studio", "description": v.description,
               "steps": v.steps, "guidance": v.guidance, "guidance_mode": v.guidance_mode,
               "guidance_interval": v.cfg_interval,
               "default_size": list(v.default_size), "min_side": v.min_side,
               "max_side": min(v.max_side, self.limits.max_side), "max_refs": min(v.max_refs, self.limits.max_refs),
               "license": v.license, "hosted": model_id in self.remote,
               "prompt_upsampling": True if v.upsampler else None}  # fmt: skip
        # prompt_upsampling: the default where the model has an upsampler, None where it has none
        if model_id in self.remote:  # what the endpoint takes, and its price when a key is configured
            e = ENDPOINTS[model_id]
            row |= {"owned_by": "black-forest-labs", "steps": e.steps[2] if e.steps else None,
                    "guidance": e.guidance[2] if e.guidance else None,
                    "guidance_mode": "embedded" if e.guidance else "none", "default_size": [1024, 1024],
                    "min_side": MIN_SIDE, "max_side": min(2048, self.limits.max_side),
                    "max_refs": min(e.max_refs, self.limits.max_refs), "takes_steps": e.steps is not None,
                    "prompt_upsampling": False if e.prompt_upsampling else None}  # fmt: skip
            if keyed:
                row["usd_per_image"] = price(e, 1024, 1024)
        return row


def admission(request: Request) -> Admission:
    """The app's `Admission` (a FastAPI dependency)."""
    return request.app.state.admission
