"""The HTTP API: native jobs (submit, status, events, cancel, result), OpenAI-compatible image routes,
models, health, uploads, and the studio page. Thin: `create_app` wires the store, the worker, the guard and
the routers (`routes_*.py`); what a request must pass is in `validation.py`, request bodies in `schemas.py`.

Safe to expose: bearer-token auth when a token is set (required for non-loopback binds, see `run`),
every limit from `limits.py` checked before anything is queued, uploads checked for type, byte size and
pixel count before decoding, files addressed by id only, CORS off unless origins are configured.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..pipeline import Pipeline
from ..variants import EMBEDDED_IDS, get_variant
from . import routes_files, routes_jobs, routes_models, routes_openai
from .guard import LOOPBACK_HOSTS, Guard
from .limits import DEFAULT_LIMITS, Limits
from .responses import SafeJSON, http_error, validation_error
from .store import Store
from .validation import Admission
from .worker import Worker

STATIC = Path(__file__).parent / "static"


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
    served = models or list(EMBEDDED_IDS)
    remote = {m for m in served if get_variant(m).hosted} | set(api_models or [])

    app = FastAPI(title="Flux2 Studio", version="1", lifespan=_lifespan(worker), default_response_class=SafeJSON)
    app.add_exception_handler(StarletteHTTPException, http_error)  # FastAPI's and those raised below it
    app.add_exception_handler(RequestValidationError, validation_error)  # its echo of the input may not be UTF-8
    app.state.store, app.state.worker, app.state.recovered = store, worker, recovered
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    hosts = None if "*" in (allowed_hosts or []) else [*LOOPBACK_HOSTS, *(allowed_hosts or [])]
    # outermost: host, origin, token and body size are checked before any route runs or any body is read
    app.add_middleware(Guard, token=token, allowed_hosts=hosts, origins=cors_origins or (),
                       body_limit=limits.body_bytes)  # fmt: skip
    app.add_middleware(HeadAsGet)  # outside the guard: a HEAD is checked as the GET it becomes
    app.state.admission = Admission(store, worker, limits, served, remote, lora_dir)
    for routes in (routes_models, routes_jobs, routes_files, routes_openai):
        app.include_router(routes.router)
    page_routes(app)
    return app


class HeadAsGet:
    """HEAD answered as GET is, headers only (curl -I, health checkers and proxies: FastAPI's GET routes answered
    it 404); event streams excepted (a HEAD would wait on the job)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" or scope["path"].endswith("/events"):
            return await self.app(scope, receive, send)

        async def headers_only(message: dict) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body"):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(dict(scope, method="GET"), receive, headers_only)


def page_routes(app: FastAPI) -> None:
    """The studio page's own files at their paths, and nothing else: a page mounted over "/" answered every other
    path (an API route with the wrong method 404 or 405 "GET, HEAD"; ../ in an id the page's HTML)."""
    for path in sorted(STATIC.iterdir()) if STATIC.is_dir() else []:
        for url in ("/", "/index.html") if path.name == "index.html" else (f"/{path.name}",):
            app.add_api_route(url, _file(path), methods=["GET"], include_in_schema=False)


def _file(path: Path) -> Callable[[], FileResponse]:
    def page_file() -> FileResponse:
        return FileResponse(path)

    return page_file


def _lifespan(worker: Worker):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    return lifespan


def run_app(app: FastAPI, host: str, port: int, grace: float) -> None:
    """Serve `app` with uvicorn until a stop signal, which first tells the worker (`Worker.begin_stop`): the running
    batch goes back to the queue at its next step, requests waiting on jobs and event streams answer (503, a last
    event) instead of being cut after `grace` seconds; then uvicorn's own graceful stop."""
    import uvicorn

    from .guard import header_timeout_protocol

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", http=header_timeout_protocol(),
                            timeout_graceful_shutdown=grace)  # fmt: skip
    server = uvicorn.Server(config)
    uvicorn_exit = server.handle_exit

    def handle_exit(sig, frame) -> None:
        app.state.worker.begin_stop()
        uvicorn_exit(sig, frame)

    server.handle_exit = handle_exit  # (installed as the signal handler by `run`)
    server.run()
