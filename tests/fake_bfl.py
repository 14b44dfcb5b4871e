"""A local stand-in for Black Forest Labs' API, implementing its documented contract on 127.0.0.1:
submit -> {id, polling_url, cost}; GET polling_url -> Pending ... Ready with result.sample (a signed
delivery URL on another host name); moderation, errors, 402, 422, 429.

Behaviour is chosen by markers in the prompt: [busy2] (429 on the first two submits), [moderated-input],
[moderated-output], [error], [error-odd-seed], [expired] (delivery URL already expired), [slow] (never ready), [422].
Keys: "good-key" works, "broke-key" has no credits, anything else is refused.
"""

from __future__ import annotations

import io
import socket
import threading
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image

MODELS = ("flux-2-pro", "flux-2-max", "flux-2-flex", "flux-kontext-pro", "flux-kontext-max",
          "flux-2-klein-4b", "flux-2-klein-9b")  # fmt: skip
GOOD_KEY = "good-key"


def make_app() -> FastAPI:
    app = FastAPI()
    app.state.requests = []  # (method, path, headers, json) of every call, for the tests to inspect
    app.state.tasks = {}
    app.state.busy = {}

    def record(request: Request, body=None) -> None:
        app.state.requests.append((request.method, request.url.path, dict(request.headers), body))

    @app.post("/v1/{model}")
    async def submit(model: str, request: Request):
        body = await request.json()
        record(request, body)
        key = request.headers.get("x-key")
        if key is None:
            return JSONResponse({"detail": "Not authenticated"}, 401)
        if key == "broke-key":
            return JSONResponse({"detail": "Insufficient credits"}, 402)
        if key != GOOD_KEY:
            return JSONResponse({"detail": f"Invalid key {key}"}, 403)  # echoes the key: the client must redact
        if model not in MODELS:
            return JSONResponse({"detail": "Not Found"}, 404)
        prompt = body.get("prompt", "")
        if "[422]" in prompt:
            return JSONResponse({"detail": [{"loc": ["body", "safety_tolerance"], "msg": "must be <= 5",
                                             "type": "less_than_equal"}]}, 422)  # fmt: skip
        if "[busy2]" in prompt:
            n = app.state.busy.get(prompt, 0)
            app.state.busy[prompt] = n + 1
            if n < 2:
                return JSONResponse({"detail": "Too many active tasks"}, 429, headers={"Retry-After": "1"})
        tid = uuid.uuid4().hex
        token = uuid.uuid4().hex[:8]  # part of the polling URL: a client that rebuilds the URL fails
        app.state.tasks[tid] = {"body": body, "model": model, "polls": 0, "token": token}
        port = request.url.port
        return {"id": tid, "polling_url": f"http://127.0.0.1:{port}/v1/get_result?id={tid}&t={token}", "cost": 3.0}

    @app.get("/v1/get_result")
    def get_result(request: Request, id: str, t: str = ""):
        record(request)
        if request.headers.get("x-key") != GOOD_KEY:
            return JSONResponse({"detail": "Not authenticated"}, 401)
        task = app.state.tasks.get(id)
        if task is None or task["token"] != t:
            return {"id": id, "status": "Task not found", "result": None}
        task["polls"] += 1
        prompt = task["body"]["prompt"]
        if "[moderated-input]" in prompt:
            return {"id": id, "status": "Request Moderated", "result": None, "details": {"Moderation Reasons": []}}
        if "[slow]" in prompt or task["polls"] < 3:
            return {"id": id, "status": "Pending", "result": None, "progress": 0.3 * task["polls"]}
        if "[moderated-output]" in prompt:
            return {"id": id, "status": "Content Moderated", "result": None, "details": {}}
        if "[error]" in prompt or ("[error-odd-seed]" in prompt and task["body"].get("seed", 0) % 2):
            return {"id": id, "status": "Error", "result": None, "details": {"reason": "internal failure"}}
        port = request.url.port
        sample = f"http://localhost:{port}/delivery/{id}.png"
        return {"id": id, "status": "Ready",
                "result": {"sample": sample, "prompt": prompt, "seed": task["body"].get("seed")}}  # fmt: skip

    @app.get("/delivery/{name}")
    def delivery(name: str, request: Request):
        record(request)
        task = app.state.tasks.get(name.removesuffix(".png"))
        if task is None or "[expired]" in task["body"]["prompt"]:
            return Response("<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>", 403)
        body = task["body"]
        if "aspect_ratio" in body:  # Kontext: about 1 MP at the ratio; small here
            a, b = (int(v) for v in body["aspect_ratio"].split(":"))
            size = (16 * a, 16 * b)
        else:
            size = (body["width"], body["height"])
        color = (body.get("seed", 0) * 37 % 256, 120, 200)
        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    return app


class FakeBfl:
    """The fake API served by uvicorn in a thread on 127.0.0.1; `url` is its base URL."""

    def __init__(self) -> None:
        self.app = make_app()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeBfl:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake BFL server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def requests(self) -> list:
        return self.app.state.requests
