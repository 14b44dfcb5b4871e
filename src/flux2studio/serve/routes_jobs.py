"""The native jobs API: submit, list, status, step preview, cancel, delete, progress events."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response, StreamingResponse

from .schemas import JobRequest
from .validation import Admission, admission

router = APIRouter()

TERMINAL = ("done", "failed", "cancelled")


@router.post("/v1/jobs", status_code=202)
def create_job(req: JobRequest, request: Request, response: Response, adm: Admission = Depends(admission)) -> dict:
    job = adm.submit(req)
    response.headers["Location"] = request.url_for("get_job", job_id=job.id).path  # (under a --root-path too)
    return job.public()


@router.get("/v1/jobs")
def list_jobs(limit: int = 50, status: str | None = None, adm: Admission = Depends(admission)) -> dict:
    status = status or None  # ?status= : every job, as before
    if status is not None and status not in ("queued", "running", *TERMINAL):  # (a typo listed nothing)
        raise HTTPException(422, f"status {status[:32]!r}: one of queued, running, {', '.join(TERMINAL)}")
    return {"data": [j.public() for j in adm.store.list(min(max(limit, 1), 500), status)]}


@router.get("/v1/jobs/{job_id}")
def get_job(job_id: str, adm: Admission = Depends(admission)) -> dict:
    job = adm.store.get(job_id)
    if job is None:
        raise HTTPException(404, "no such job")
    return job.public()


@router.get("/v1/jobs/{job_id}/preview", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}, 204: {"description": "no preview yet"}})  # fmt: skip
def job_preview(job_id: str, adm: Admission = Depends(admission)) -> Response:
    """The running job's latest step, decoded from the model's estimate of the final image (JPEG)."""
    if adm.store.get(job_id) is None:
        raise HTTPException(404, "no such job")
    data = adm.worker.previews.get(job_id)
    if data is None:
        return Response(status_code=204)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


@router.delete("/v1/jobs/{job_id}")
def delete_job(job_id: str, adm: Admission = Depends(admission)) -> dict:
    """Remove a finished job and its images (a queued or running one: cancel it first)."""
    job = adm.store.get(job_id)
    if job is None:
        raise HTTPException(404, "no such job")
    if not adm.store.delete(job_id):
        raise HTTPException(409, f"job {job_id} is {job.status}: cancel it first")
    return {"id": job_id, "deleted": True}


@router.post("/v1/jobs/{job_id}/cancel")
def cancel_job(job_id: str, adm: Admission = Depends(admission)) -> dict:
    job = adm.store.get(job_id)
    if job is None:
        raise HTTPException(404, "no such job")
    if job.status in ("done", "failed"):  # (answered 200 as if cancelled)
        raise HTTPException(409, f"job {job_id} is {job.status}: nothing to cancel")
    adm.store.cancel(job_id)
    return adm.store.get(job_id).public()


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, adm: Admission = Depends(admission)) -> StreamingResponse:
    if adm.store.get(job_id) is None:
        raise HTTPException(404, "no such job")

    async def stream():
        last = None
        while True:
            job = adm.store.get(job_id)
            if job is None:  # cancelled and deleted meanwhile (the stream broke off)
                yield f"event: deleted\ndata: {json.dumps({'id': job_id, 'status': 'deleted'})}\n\n"
                return
            if adm.worker.stopping and job.status not in TERMINAL:  # the server stops: say so, end (the job runs
                yield f"event: restarting\ndata: {json.dumps(job.public())}\n\n"  # after the restart)
                return
            state = (job.status, job.step)
            if state != last:
                yield f"event: progress\ndata: {json.dumps(job.public())}\n\n"
                last = state
            if job.status in TERMINAL:
                return
            await asyncio.sleep(0.2)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
