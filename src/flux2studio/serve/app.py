"""The HTTP API: native jobs (submit, status, events, cancel, result), OpenAI-compatible image routes,
models, health, uploads, and the studio page. Thin: it validates, stores, and lets the worker generate.

Safe to expose: bearer-token auth when a token is set (required for non-loopback binds, see `run`),
every limit from `limits.py` checked before anything is queued, uploads checked for type, byte size and
pixel count before decoding, files addressed by id only, CORS off unless origins are configured.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..hosted import ENDPOINTS, MIN_SIDE, MODERATED, check_request, key_present, price
from ..images import size_for_aspect
from ..pipeline import Pipeline, build_request
from ..variants import VARIANTS, get_variant
from .guard import LOOPBACK_HOSTS, Guard
from .limits import DEFAULT_LIMITS, Limits
from .store import UPLOAD_SUFFIXES, Store
from .worker import Worker

STATIC = Path(__file__).parent / "static"
TERMINAL = ("done", "failed", "cancelled")


class JobRequest(BaseModel):
    model: str = Field(default="nano", max_length=64)
    prompt: str  # text fields: length, NUL and Unicode checked in validate (Limits.text_problem)
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    aspect: str | None = Field(default=None, max_length=16)
    steps: int | None = None
    guidance: float | None = None
    guidance_interval: tuple[float, float] | None = None  # CFG models: noise levels guided (default: the model's)
    prompt_upsampling: bool | None = None  # nano: the planner (default on); flex, Kontext: the API's (default off)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    num_images: int = 1
    refs: list[str] = []  # upload ids
    loras: list[tuple[str, float]] = []  # server-side LoRA names (see --lora-dir) and scales
    # editing (local models): a start image (upload id) for image-to-image; with a mask (upload id, white =
    # repaint) or an expansion (px left, top, right, bottom) only that area is generated
    image: str | None = Field(default=None, max_length=64)
    mask: str | None = Field(default=None, max_length=64)
    strength: float | None = None  # (0, 1]; default 0.75, 1 with a mask or expansion
    expand: tuple[int, int, int, int] | None = None
    mask_blur: int = 0


class OpenAIGeneration(BaseModel):
    prompt: str
    model: str = Field(default="nano", max_length=64)
    n: int = 1
    size: str | None = Field(default=None, max_length=16)  # "WIDTHxHEIGHT"
    response_format: Literal["b64_json", "url"] = "b64_json"
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    stream: bool = False  # partial images are not streamed: True is a clear 400


def create_app(
    data: str | Path,
    loader: Callable[[str], Pipeline],
    token: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    cors_origins: list[str] | None = None,
    models: list[str] | None = None,
    lora_dir: str | Path | None = None,
    api_models: list[str] | None = None,
    db: str | None = None,
    files: str | Path | None = None,
    store: Store | None = None,
    worker: Worker | None = None,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """`api_models`: served ids that run on Black Forest Labs' API although they have local weights
    (klein via `--model klein-4b=api`); hosted-only ids (pro, max, ...) always do. `db`: a PostgreSQL URL
    (default: SQLite in `data`); `files`: the folder for images and uploads (default: `data`). `store` and
    `worker` replace the defaults (the Ray Serve ingress passes a remote-dispatching worker).
    `allowed_hosts`: Host names served besides the loopback ones ("*": any name, for a proxy that rewrites
    Host); no other name is served, so a page that makes its own name resolve here (DNS rebinding) gets
    nothing (`guard.Guard`)."""
    store = store or Store(data, db=db, files=files)
    recovered = store.recover()
    worker = worker or Worker(store, loader)
    served = models or [v.id for v in VARIANTS.values() if v.id in ("nano", "nano-base")]
    remote = {m for m in served if get_variant(m).hosted} | set(api_models or [])

    app = FastAPI(title="Flux2 Studio", version="1", lifespan=_lifespan(worker), default_response_class=SafeJSON)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # FastAPI's and those raised below it
    app.add_exception_handler(RequestValidationError, _validation_error)  # its echo of the input may not be UTF-8
    app.state.store, app.state.worker, app.state.recovered = store, worker, recovered
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    hosts = None if "*" in (allowed_hosts or []) else [*LOOPBACK_HOSTS, *(allowed_hosts or [])]
    # outermost: host, origin, token and body size are checked before any route runs or any body is read
    app.add_middleware(Guard, token=token, allowed_hosts=hosts, origins=cors_origins or (),
                       body_limit=limits.body_bytes)  # fmt: skip

    def validate(req: JobRequest) -> tuple[dict, int]:
        """Every check before queueing: limits table, then the model's own rules (build_request)."""
        check_basics(req.model, req.num_images, prompt=req.prompt, negative_prompt=req.negative_prompt)
        variant = get_variant(req.model)
        if len(req.refs) > limits.max_refs:
            raise HTTPException(422, f"{len(req.refs)} references; at most {limits.max_refs}")
        if len(req.loras) > limits.max_loras:
            raise HTTPException(422, f"{len(req.loras)} LoRAs; at most {limits.max_loras}")
        if req.steps is not None and not 1 <= req.steps <= limits.max_steps:
            raise HTTPException(422, f"steps {req.steps} is out of range 1..{limits.max_steps}")
        if req.aspect is not None:
            try:
                req.width, req.height = size_for_aspect(req.aspect, variant.default_size[0] * variant.default_size[1])
            except ValueError as e:
                raise HTTPException(422, str(e)) from None
        for ref in req.refs:
            if store.ref_path(ref) is None:
                raise HTTPException(422, f"unknown reference id {ref[:64]!r}: upload it to /v1/uploads first")
        edit = editing(req)
        width = height = None  # an edit without a size: its start image (and expansion) sets it
        if not edit or req.width is not None or req.height is not None:
            width = variant.default_size[0] if req.width is None else req.width  # 0 is a size, and out of range
            height = variant.default_size[1] if req.height is None else req.height
            check_area(width, height)
        loras = []
        for name, scale in req.loras:
            plain = len(name) <= 128 and name.isascii() and name.replace("-", "").replace("_", "").isalnum()
            path = Path(lora_dir or "/nonexistent") / f"{name}.safetensors"
            if not (plain and path.is_file()):  # a name, never a path (and never long enough to fail the OS)
                raise HTTPException(422, f"unknown LoRA {name[:64]!r}")
            if not abs(scale) <= limits.max_lora_scale:  # also refuses NaN
                raise HTTPException(422, f"LoRA {name!r} scale {scale} is out of range "
                                         f"-{limits.max_lora_scale:g}..{limits.max_lora_scale:g}")  # fmt: skip
            loras.append((str(path), float(scale)))
        interval, upsampling = None, req.prompt_upsampling
        if req.model in remote:  # progress of a hosted job counts its images, not steps
            if req.guidance_interval is not None:
                raise HTTPException(422, f"{req.model} is a hosted model: the API sets its own guidance, no interval")
            steps, guidance = hosted_rules(req, width, height, loras)
            progress_total = req.num_images
        else:
            size = None if width is None else (width, height)
            try:  # the model's own checks: multiples of 16, its size range, guidance mode, negative prompt
                built = build_request(variant, req.prompt, negative_prompt=req.negative_prompt, size=size,
                                      steps=req.steps, guidance=req.guidance, num_images=req.num_images,
                                      guidance_interval=req.guidance_interval, refs=(),
                                      prompt_upsampling=req.prompt_upsampling, **edit)  # fmt: skip
            except ValueError as e:
                raise HTTPException(422, str(e)) from None
            if built.init is not None:
                room = variant.max_refs - (built.init.mask is not None and variant.inpaint_reference)
                if len(req.refs) > room:
                    raise HTTPException(422, f"{len(req.refs)} references; {req.model} takes 0..{room} besides the "
                                             "image being inpainted")  # fmt: skip
                width, height = built.width, built.height
                check_area(width, height)
                edit = {"image": req.image, "mask": req.mask, "strength": built.init.strength,
                        "expand": list(built.init.expand) if any(built.init.expand) else None,
                        "mask_blur": req.mask_blur}  # fmt: skip
            steps, guidance = built.steps, built.guidance
            if variant.guidance_mode == "cfg":  # resolved, so the job runs the same whatever the defaults become
                interval = list(built.guidance_interval)
            if variant.upsampler:  # resolved too
                upsampling = built.prompt_upsampling
            progress_total = built.steps
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        settings = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "width": width, "height": height,
                    "steps": steps, "guidance": guidance, "guidance_interval": interval, "seed": seed,
                    "num_images": req.num_images, "refs": req.refs, "loras": loras,
                    "prompt_upsampling": upsampling, **edit}  # fmt: skip
        return settings, progress_total

    def editing(req: JobRequest) -> dict:
        """The start image and mask opened (ids checked), with the edit's other fields; {} when not an edit."""
        if req.image is None:
            if req.mask is not None or req.strength is not None or req.expand is not None or req.mask_blur:
                raise HTTPException(422, "mask, strength, expand and mask_blur edit a start image: give image")
            return {}
        if req.model in remote:
            raise HTTPException(422, f"{req.model} is a hosted model: editing a start image runs on local models")
        opened = {}
        for key in ("image", "mask"):
            upload = getattr(req, key)
            if upload is None:
                continue
            if store.ref_path(upload) is None:
                raise HTTPException(422, f"unknown {key} id {upload[:64]!r}: upload it to /v1/uploads first")
            with Image.open(store.ref_path(upload)) as im:
                opened[key] = im.copy()
        return {**opened, "strength": req.strength, "expand": req.expand, "mask_blur": req.mask_blur}

    def check_area(width: int, height: int) -> None:
        for name, value in (("width", width), ("height", height)):
            if not 1 <= value <= limits.max_side:
                raise HTTPException(422, f"{name} {value} is out of range 1..{limits.max_side}")
        if width * height > limits.max_megapixels * 1e6:
            raise HTTPException(422, f"{width}x{height} is over {limits.max_megapixels} megapixels")

    def check_basics(model: str, num_images: int, **texts: str | None) -> None:
        """What needs no model and no image: the model is served, the count and the texts are in range."""
        if model not in served:
            raise HTTPException(422, f"model {model[:64]!r} is not served here; served: {', '.join(served)}")
        if not 1 <= num_images <= limits.max_images:
            raise HTTPException(422, f"num_images {num_images} is out of range 1..{limits.max_images}")
        for name, text in texts.items():
            if (problem := limits.text_problem(name, text)) is not None:
                raise HTTPException(422, problem)

    def hosted_rules(req: JobRequest, width: int, height: int, loras: list) -> tuple[int | None, float | None]:
        """The hosted endpoint's own rules (no LoRAs, steps and guidance only for flex, 32-bit seeds)."""
        if loras:
            raise HTTPException(422, f"{req.model} runs on the hosted API, which takes no LoRA files")
        if req.seed is not None and req.seed >= 2**32:
            raise HTTPException(422, f"seed {req.seed} is out of range 0..2**32-1 for hosted models")
        sizes = []
        for r in req.refs:  # headers only: the count and the sizes
            with Image.open(store.ref_path(r)) as im:
                sizes.append(im.size)
        try:
            _, _, steps, guidance, _ = check_request(ENDPOINTS[req.model], size=(width, height), steps=req.steps,
                                                     guidance=req.guidance, negative_prompt=req.negative_prompt,
                                                     ref_sizes=sizes)  # fmt: skip
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return steps, guidance

    def submit(req: JobRequest):
        settings, steps = validate(req)
        if limits.keep_finished_s is not None:
            store.expire_jobs(limits.keep_finished_s)
        if (problem := limits.disk_problem(store.disk_bytes)) is not None:
            raise HTTPException(507, problem)
        if store.count("queued", "running") >= limits.max_queue:
            raise HTTPException(
                429, f"queue full ({limits.max_queue} jobs); retry later", headers={"Retry-After": "10"}
            )
        job = store.add(req.model, settings, steps)
        worker.notify()
        return job

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "queued": store.count("queued"), "running": store.count("running")}

    @app.get("/v1/models")
    def list_models() -> dict:
        keyed = bool(remote) and key_present()
        return {"object": "list", "data": [model_row(model_id, keyed) for model_id in served]}

    @app.get("/v1/models/{model_id}")
    def retrieve_model(model_id: str) -> dict:
        if model_id not in served:
            raise HTTPException(404, f"model {model_id!r} is not served here; served: {', '.join(served)}")
        return model_row(model_id, bool(remote) and key_present())

    def model_row(model_id: str, keyed: bool) -> dict:
        """What /v1/models says of one served model (OpenAI's fields first, then ours)."""
        v = get_variant(model_id)
        row = {"id": v.id, "object": "model", "owned_by": "flux2studio", "description": v.description,
               "steps": v.steps, "guidance": v.guidance, "guidance_mode": v.guidance_mode,
               "guidance_interval": v.cfg_interval,
               "default_size": list(v.default_size), "min_side": v.min_side,
               "max_side": min(v.max_side, limits.max_side), "max_refs": min(v.max_refs, limits.max_refs),
               "license": v.license, "hosted": model_id in remote,
               "prompt_upsampling": True if v.upsampler else None}  # fmt: skip
        # prompt_upsampling: the default where the model has an upsampler, None where it has none
        if model_id in remote:  # what the endpoint takes, and its price when a key is configured
            e = ENDPOINTS[model_id]
            row |= {"owned_by": "black-forest-labs", "steps": e.steps[2] if e.steps else None,
                    "guidance": e.guidance[2] if e.guidance else None,
                    "guidance_mode": "embedded" if e.guidance else "none", "default_size": [1024, 1024],
                    "min_side": MIN_SIDE, "max_side": min(2048, limits.max_side),
                    "max_refs": min(e.max_refs, limits.max_refs), "takes_steps": e.steps is not None,
                    "prompt_upsampling": False if e.prompt_upsampling else None}  # fmt: skip
            if keyed:
                row["usd_per_image"] = price(e, 1024, 1024)
        return row

    @app.post("/v1/jobs", status_code=202)
    def create_job(req: JobRequest) -> dict:
        return submit(req).public()

    @app.get("/v1/jobs")
    def list_jobs(limit: int = 50, status: str | None = None) -> dict:
        return {"data": [j.public() for j in store.list(min(max(limit, 1), 500), status)]}

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        job = store.get(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        return job.public()

    @app.get("/v1/jobs/{job_id}/preview", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 204: {"description": "no preview yet"}})  # fmt: skip
    def job_preview(job_id: str) -> Response:
        """The running job's latest step, decoded from the model's estimate of the final image (JPEG)."""
        if store.get(job_id) is None:
            raise HTTPException(404, "no such job")
        data = worker.previews.get(job_id)
        if data is None:
            return Response(status_code=204)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.delete("/v1/jobs/{job_id}")
    def delete_job(job_id: str) -> dict:
        """Remove a finished job and its images (a queued or running one: cancel it first)."""
        job = store.get(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        if not store.delete(job_id):
            raise HTTPException(409, f"job {job_id} is {job.status}: cancel it first")
        return {"id": job_id, "deleted": True}

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict:
        if store.get(job_id) is None:
            raise HTTPException(404, "no such job")
        store.cancel(job_id)
        return store.get(job_id).public()

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str) -> StreamingResponse:
        if store.get(job_id) is None:
            raise HTTPException(404, "no such job")

        async def stream():
            last = None
            while True:
                job = store.get(job_id)
                state = (job.status, job.step)
                if state != last:
                    yield f"event: progress\ndata: {json.dumps(job.public())}\n\n"
                    last = state
                if job.status in TERMINAL:
                    return
                await asyncio.sleep(0.2)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/v1/images/{name}")
    def get_image(name: str) -> FileResponse:
        path = store.image_path(name.removesuffix(".png"))
        if path is None:
            raise HTTPException(404, "no such image")
        return FileResponse(path, media_type="image/png")

    @app.post("/v1/uploads")
    async def upload(file: UploadFile = File(...)) -> dict:
        return {"id": await save_upload(file, store, limits)}

    @app.post("/v1/images/generations")
    async def openai_generations(req: OpenAIGeneration, request: Request) -> dict:
        if req.stream:
            raise HTTPException(400, "stream=true is not supported: images come back whole (omit stream)")
        width, height = _parse_size(req.size)
        job = submit(job_request(model=req.model, prompt=req.prompt, width=width, height=height, num_images=req.n,
                                 seed=req.seed, steps=req.steps, guidance=req.guidance,
                                 negative_prompt=req.negative_prompt))  # fmt: skip
        return await _openai_result(store, job.id, req.response_format, request)

    @app.post("/v1/images/edits")
    async def openai_edits(
        request: Request,
        image: list[UploadFile] = File(None),
        image_array: list[UploadFile] = File(None, alias="image[]"),  # how the openai client sends a list
        prompt: str = Form(...),
        mask: UploadFile | None = File(None),  # OpenAI's: fully transparent pixels (alpha 0) are edited
        model: str = Form("nano"),
        n: int = Form(1),
        size: str | None = Form(None),
        response_format: str = Form("b64_json"),
        seed: int | None = Form(None),
    ) -> dict:
        if response_format not in ("b64_json", "url"):
            raise HTTPException(422, f"response_format {response_format[:64]!r}: b64_json or url")
        images = [*(image or []), *(image_array or [])]
        if not 1 <= len(images) <= limits.max_refs:
            raise HTTPException(422, f"{len(images)} images given (image or image[]); 1..{limits.max_refs}")
        width, height = _parse_size(size)
        check_basics(model, n, prompt=prompt)  # before any image is written
        if mask is not None:  # inpainting: the first image is edited where the mask is transparent
            mask_id = await asyncio.to_thread(_alpha_mask, await mask.read(limits.max_upload_bytes + 1), store, limits)
            start, *refs = [await save_upload(f, store, limits) for f in images]
            request_ = job_request(model=model, prompt=prompt, width=width, height=height, num_images=n, seed=seed,
                                   image=start, mask=mask_id, refs=refs)  # fmt: skip
            job = await asyncio.to_thread(submit, request_)  # resizes and hashes the images: off the event loop
            return await _openai_result(store, job.id, response_format, request)
        refs = [await save_upload(f, store, limits) for f in images]
        if width is None:  # the output follows the first image, as in the CLI
            with Image.open(store.ref_path(refs[0])) as first:
                width, height = first.width // 16 * 16, first.height // 16 * 16
        job = submit(job_request(model=model, prompt=prompt, width=width, height=height, num_images=n, seed=seed,
                                 refs=refs))  # fmt: skip
        return await _openai_result(store, job.id, response_format, request)

    if STATIC.is_dir():
        app.mount("/", StaticFiles(directory=STATIC, html=True), name="studio")
    return app


def job_request(**fields) -> JobRequest:
    """A JobRequest from another route's fields; a field out of range is a 422 naming it, not a crash."""
    try:
        return JobRequest(**fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise HTTPException(422, problems) from None


def _lifespan(worker: Worker):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    return lifespan


class SafeJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: a stored text that is not valid Unicode (a row written before
    the edge checked it) still serializes, so no listing route fails on one bad row."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})", re.ASCII)  # "1024x768": ASCII digits, nothing else


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    match = SIZE.fullmatch(size)
    if match is None:
        raise HTTPException(422, f"size {size[:64]!r} is not WIDTHxHEIGHT in pixels, e.g. 1024x768")
    return int(match[1]), int(match[2])


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Errors carry `detail` (FastAPI's shape, the page reads it) and `error` (OpenAI's: its clients show
    `error.message`)."""
    error = _error_body(str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")
    return SafeJSON({"detail": exc.detail, "error": error}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, rendered by SafeJSON: the input it quotes back may hold a lone surrogate."""
    errors = jsonable_encoder(exc.errors())
    message = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in errors)
    return SafeJSON({"detail": errors, "error": _error_body(message, "invalid_request_error")}, status_code=422)


def _error_body(message: str, kind: str, code: str | None = None) -> dict:
    """OpenAI's error object (its clients show `message`)."""
    return {"message": message, "type": kind, "param": None, "code": code}


def _openai_error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape. `x-should-retry: false` tells OpenAI's clients (which retry 409, 429 and 5xx
    by default) not to send the request again: a failed or cancelled generation would only run again."""
    return SafeJSON(
        {"error": _error_body(message, kind, code)}, status_code=status, headers={"x-should-retry": "false"}
    )


async def _openai_result(store: Store, job_id: str, response_format: str, request: Request,
                         timeout: float = 600) -> dict | JSONResponse:  # fmt: skip
    """Wait for the job; a client that goes away before its job starts cancels it (nobody would see it)."""
    deadline = time.monotonic() + timeout
    while True:
        job = store.get(job_id)
        if job.status == "done":
            break
        if job.status == "failed" and any(status in (job.error or "") for status in MODERATED):
            return _openai_error(400, job.public()["error"], "invalid_request_error", "content_policy_violation")
        if job.status == "failed":  # the generation itself went wrong: a server error, not to be retried
            return _openai_error(500, f"generation failed: {job.public()['error'] or 'unknown error'}", "server_error")
        if job.status == "cancelled":
            return _openai_error(409, "generation cancelled", "cancelled")
        if job.status == "queued" and await request.is_disconnected():
            store.cancel(job_id)
            return _openai_error(409, "client went away: generation cancelled", "cancelled")
        if time.monotonic() > deadline:
            return JSONResponse({"id": job_id, "status": job.status}, status_code=202)
        await asyncio.sleep(0.1)
    data = []
    for image_id in job.images:
        if response_format == "url":  # absolute, as OpenAI's are: built from the request's (allow-listed) host
            data.append({"url": str(request.url_for("get_image", name=f"{image_id}.png"))})
        else:
            data.append({"b64_json": base64.b64encode(store.image_path(image_id).read_bytes()).decode()})
    return {"created": int(job.finished or time.time()), "data": data}


UPLOAD_SUFFIX = dict(zip(("PNG", "JPEG", "WEBP"), UPLOAD_SUFFIXES, strict=True))  # Pillow's format -> file
DECODES = threading.BoundedSemaphore(2)  # uploads decoded at once, each in a thread (the event loop keeps answering)


async def save_upload(file: UploadFile, store: Store, limits: Limits) -> str:
    """Check byte size, format and pixel count before decoding, then that it decodes whole; store the bytes as
    they came (no re-encoding: a photo stays a JPEG) under a new id. Old unreferenced uploads go first."""
    raw = await file.read(limits.max_upload_bytes + 1)
    if len(raw) > limits.max_upload_bytes:
        raise HTTPException(413, f"upload is over {limits.max_upload_bytes} bytes")
    return await asyncio.to_thread(_store_image, raw, store, limits)


def _store_image(raw: bytes, store: Store, limits: Limits) -> str:
    with DECODES:
        suffix = _check_image(raw, limits)
    store.expire_refs(limits.upload_ttl_s)
    if (problem := limits.disk_problem(store.disk_bytes, len(raw))) is not None:
        raise HTTPException(507, problem)
    return store.save_ref(raw, suffix)


def _alpha_mask(raw: bytes, store: Store, limits: Limits) -> str:
    """OpenAI's mask (a PNG whose fully transparent pixels mark what to edit) stored as ours: white = repaint."""
    if len(raw) > limits.max_upload_bytes:
        raise HTTPException(413, f"mask is over {limits.max_upload_bytes} bytes")
    with DECODES:
        _check_image(raw, limits)
        with Image.open(io.BytesIO(raw)) as im:
            if not (im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info):
                raise HTTPException(422, f"mask has no alpha channel (mode {im.mode}): OpenAI's masks are PNGs "
                                         "whose fully transparent pixels mark the area to edit")  # fmt: skip
            alpha = im.convert("RGBA").getchannel("A")
    ours = alpha.point(lambda a: 255 if a == 0 else 0)
    buf = io.BytesIO()
    ours.save(buf, format="PNG")
    return _store_image(buf.getvalue(), store, limits)


def _check_image(raw: bytes, limits: Limits) -> str:
    """The file suffix of an acceptable image (PNG, JPEG, WEBP within the pixel limit, decodable)."""
    try:
        with Image.open(io.BytesIO(raw)) as probe:  # reads the header only: no decoding yet
            if probe.format not in UPLOAD_SUFFIX:
                raise HTTPException(415, f"image format {probe.format} not accepted: PNG, JPEG or WEBP")
            w, h = probe.size
            if w * h > limits.max_upload_pixels:
                raise HTTPException(413, f"image is {w}x{h}: over {limits.max_upload_pixels} pixels")
            probe.convert("RGB")  # decodes it all: a truncated or corrupt file is refused now, not in a job
            return UPLOAD_SUFFIX[probe.format]
    except HTTPException:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard fired first: same answer
        raise HTTPException(413, f"image is over {limits.max_upload_pixels} pixels") from None
    except Exception:
        raise HTTPException(415, "not a readable image") from None
