"""Images by id and uploads (references, start images, masks)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, HTTPException, UploadFile
from fastapi.responses import FileResponse

from .uploads import save_upload
from .validation import Admission, admission

router = APIRouter()


@router.get("/v1/images/{name}")
def get_image(name: str, adm: Admission = Depends(admission)) -> FileResponse:
    path = adm.store.image_path(name.removesuffix(".png"))
    if path is None:
        raise HTTPException(404, "no such image")
    return FileResponse(path, media_type="image/png")


@router.post("/v1/uploads")
async def upload(file: UploadFile = File(...), adm: Admission = Depends(admission)) -> dict:
    return {"id": await save_upload(file, adm.store, adm.limits)}
