"""How the API answers: JSON that always serializes, errors in FastAPI's and OpenAI's shapes at once."""

from __future__ import annotations

import json
import math

from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request


class SafeJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: a stored text that is not valid Unicode (a row written before
    the edge checked it) still serializes, so no listing route fails on one bad row."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Errors carry `detail` (FastAPI's shape, the page reads it) and `error` (OpenAI's: its clients show
    `error.message`)."""
    error = error_body(str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")
    return SafeJSON({"detail": exc.detail, "error": error}, status_code=exc.status_code, headers=exc.headers)


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, rendered by SafeJSON: the input it quotes back may hold a lone surrogate."""
    errors = _finite(jsonable_encoder(exc.errors()))
    message = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in errors)
    fields = [str(e["loc"][-1]) for e in errors if len(e.get("loc", ())) > 1]  # ("body", "steps") -> steps
    error = error_body(message, "invalid_request_error") | {"param": fields[0] if fields else None}  # OpenAI's
    return SafeJSON({"detail": errors, "error": error}, status_code=422)


def _finite(value: object) -> object:
    """`value` with every NaN or infinity (Python's JSON reader takes `NaN`, `Infinity` and `1e400`) as its text:
    a 422 quoting one back must still be JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    """OpenAI's error object (its clients show `message`)."""
    return {"message": message, "type": kind, "param": None, "code": code}


def openai_error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape. `x-should-retry: false` tells OpenAI's clients (which retry 409, 429 and 5xx
    by default) not to send the request again: a failed or cancelled generation would only run again."""
    return SafeJSON({"error": error_body(message, kind, code)}, status_code=status, headers={"x-should-retry": "false"})


def stopping_response(job_id: str) -> JSONResponse:
    """A request waiting on a job while the server stops: the job stays queued and runs after the restart, so a
    client must not send it again (`x-should-retry: false`) but look the job up (was a plain-text 500)."""
    message = f"the server is restarting: job {job_id} stays queued and runs after it (GET /v1/jobs/{job_id})"
    return SafeJSON({"id": job_id, "detail": message, "error": error_body(message, "server_error", "restarting")},
                    status_code=503, headers={"x-should-retry": "false", "Retry-After": "10"})  # fmt: skip
