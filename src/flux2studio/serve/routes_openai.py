"""OpenAI-compatible image routes: `POST /v1/images/generations` and `POST /v1/images/edits`."""

from __future__ import annotations

import asyncio
import base64
import time

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse

from ..hosted import MODERATED
from ..variants import parse_size
from .responses import openai_error, stopping_response
from .schemas import OpenAIGeneration, job_request
from .uploads import alpha_mask, checked_upload, save_checked
from .validation import Admission, admission

router = APIRouter()


@router.post("/v1/images/generations")
async def openai_generations(req: OpenAIGeneration, request: Request, adm: Admission = Depends(admission)) -> dict:
    if req.stream:
        raise HTTPException(400, "stream=true is not supported: images come back whole (omit stream)")
    width, height = _parse_size(req.size)
    model = adm.model_or_default(req.model)
    adm.check_basics(model, req.n, count="n")  # named as this route names it
    job = await asyncio.to_thread(adm.submit, job_request(
        model=model, prompt=req.prompt, width=width, height=height, num_images=req.n, seed=req.seed,
        steps=req.steps, guidance=req.guidance, negative_prompt=req.negative_prompt))  # fmt: skip
    return await _openai_result(adm, job.id, req.response_format, request)


@router.post("/v1/images/edits")
async def openai_edits(
    request: Request,
    image: list[UploadFile] = File(None),
    image_array: list[UploadFile] = File(None, alias="image[]"),  # how the openai client sends a list
    prompt: str = Form(...),
    mask: UploadFile | None = File(None),  # OpenAI's: fully transparent pixels (alpha 0) are edited
    model: str | None = Form(None),  # None: the server's default
    n: int = Form(1),
    size: str | None = Form(None),
    response_format: str = Form("b64_json"),
    seed: int | None = Form(None),
    steps: int | None = Form(None),  # ours, as on /generations (were ignored here)
    guidance: float | None = Form(None),
    negative_prompt: str | None = Form(None),
    adm: Admission = Depends(admission),
) -> dict:
    if response_format not in ("b64_json", "url"):
        raise HTTPException(422, f"response_format {response_format[:64]!r}: b64_json or url")
    images = [*(image or []), *(image_array or [])]
    if not 1 <= len(images) <= adm.limits.max_refs:
        raise HTTPException(422, f"{len(images)} images given (image or image[]); 1..{adm.limits.max_refs}")
    width, height = _parse_size(size)
    model = adm.model_or_default(model)
    adm.check_basics(model, n, count="n", prompt=prompt)  # before any image is read
    checked = [await checked_upload(f, adm.limits) for f in images]  # every upload checked before one is stored
    if mask is not None:  # inpainting: the first image is edited where the mask is transparent
        raw = await mask.read(adm.limits.max_upload_bytes + 1)
        checked.append(await asyncio.to_thread(alpha_mask, raw, adm.limits))
    ids = await asyncio.to_thread(save_checked, checked, adm.store, adm.limits)
    mask_id = ids.pop() if mask is not None else None
    start, refs = (ids[0], ids[1:]) if mask_id is not None else (None, ids)  # without a mask and a size, the
    # output follows the first image (fitted to the model's sides), as in the CLI
    try:
        fields = job_request(model=model, prompt=prompt, width=width, height=height, num_images=n, seed=seed,
                             steps=steps, guidance=guidance, negative_prompt=negative_prompt, image=start,
                             mask=mask_id, refs=refs)  # fmt: skip
        job = await asyncio.to_thread(adm.submit, fields)  # may resize and hash images: off the event loop
    except Exception:  # refused: what it stored goes (was kept until the uploads' time ran out)
        adm.store.drop_refs([*ids, *([mask_id] if mask_id else [])])
        raise
    return await _openai_result(adm, job.id, response_format, request)


async def _openai_result(adm: Admission, job_id: str, response_format: str, request: Request,
                         timeout: float = 600) -> dict | JSONResponse:  # fmt: skip
    """Wait for the job; a client that goes away before its job starts cancels it (nobody would see it)."""
    store = adm.store
    deadline = time.monotonic() + timeout
    while True:
        job = store.get(job_id)
        if job is None:  # cancelled and deleted by another request meanwhile
            return openai_error(404, f"job {job_id} was deleted", "invalid_request_error", "not_found")
        if job.status == "done":
            break
        if job.status == "failed" and any(status in (job.error or "") for status in MODERATED):
            return openai_error(400, job.public()["error"], "invalid_request_error", "content_policy_violation")
        if job.status == "failed":  # the generation itself went wrong: a server error, not to be retried
            return openai_error(500, f"generation failed: {job.public()['error'] or 'unknown error'}", "server_error")
        if job.status == "cancelled":
            return openai_error(409, "generation cancelled", "cancelled")
        if job.status == "queued" and await request.is_disconnected():
            store.cancel(job_id)
            return openai_error(409, "client went away: generation cancelled", "cancelled")
        if time.monotonic() > deadline:
            return JSONResponse({"id": job_id, "status": job.status}, status_code=202)
        if adm.worker.stopping:  # the job stays queued and runs after the restart: a retry would make it twice
            return stopping_response(job_id)
        await asyncio.sleep(0.1)
    data = []
    for image_id in job.images:
        if response_format == "url":  # absolute, as OpenAI's are: built from the request's (allow-listed) host
            data.append({"url": str(request.url_for("get_image", name=f"{image_id}.png"))})
        else:
            data.append({"b64_json": base64.b64encode(store.image_path(image_id).read_bytes()).decode()})
    return {"created": int(job.finished or time.time()), "data": data}


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":  # "auto": OpenAI's default for its newer models; here the model's
        return None, None
    try:
        return parse_size(size)
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
