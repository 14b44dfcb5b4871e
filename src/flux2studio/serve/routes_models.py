"""Health and the served models (`GET /v1/models`, OpenAI's shape with our fields)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException

from ..hosted import key_present
from .validation import Admission, admission

router = APIRouter()


@router.get("/health")
def health(adm: Admission = Depends(admission)) -> dict:
    return {"status": "ok", "queued": adm.store.count("queued"), "running": adm.store.count("running")}


@router.get("/v1/models")
def list_models(adm: Admission = Depends(admission)) -> dict:
    keyed = bool(adm.remote) and key_present()
    return {"object": "list", "data": [adm.model_row(model_id, keyed) for model_id in adm.served]}


@router.get("/v1/models/{model_id}")
def retrieve_model(model_id: str, adm: Admission = Depends(admission)) -> dict:
    if model_id not in adm.served:
        raise HTTPException(404, f"model {model_id!r} is not served here; served: {', '.join(adm.served)}")
    return adm.model_row(model_id, bool(adm.remote) and key_present())
