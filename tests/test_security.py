"""The server against a hostile client, each attack first as it was made against the server before the fix:
bodies before auth and without limit, a poisoned prompt in a batch, DNS rebinding and cross-origin posts,
sloppy sizes; and the official `openai` client against it. A real uvicorn server on 127.0.0.1 (raw sockets
for what an HTTP library will not send), the embedded nano model; every loop is bounded."""

import base64
import io
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from flux2studio.loading import load
from flux2studio.serve.app import create_app
from flux2studio.serve.guard import header_timeout_protocol
from flux2studio.serve.limits import Limits
from flux2studio.settings import GenerationSettings

TOKEN = "s3cret"
LOCAL = "http://127.0.0.1"
LIMITS = Limits(max_side=256)


def _nano(model_id):
    return load(model_id, device="cpu", resident=True)


class Server:
    """create_app under uvicorn in a thread, on a free 127.0.0.1 port."""

    def __init__(self, data, head_timeout: float = 10.0, **kw):
        self.app = create_app(data, _nano, models=["nano"], limits=LIMITS, **kw)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", http=header_timeout_protocol(head_timeout)
        )  # as `flux2 serve` runs it
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def raw(self, head: str, body: bytes = b"", wait: float = 30) -> tuple[int, str]:
        """Send a request's head (and maybe part of a body) as bytes; the status and text of the answer."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=wait) as s:
            s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
            data = b""
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        status = int(data.split(b" ", 2)[1])
        return status, data.split(b"\r\n\r\n", 1)[1].decode(errors="replace")


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


@pytest.fixture
def server(tmp_path):
    with Server(tmp_path / "data", token=TOKEN) as s:
        yield s


def test_the_token_is_checked_before_the_body_is_read(server):
    """Claimed 300 MB, sent nothing of it: the 401 comes at once (before: the body was read and parsed first)."""
    status, text = server.raw(f"POST /v1/jobs HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
                              f"Content-Length: {300 * 2**20}\n", wait=10)  # fmt: skip
    assert status == 401 and "bearer token" in text


def test_bodies_over_the_route_limit_are_refused_before_parsing(server):
    auth = f"Authorization: Bearer {TOKEN}\n"
    status, text = server.raw(f"POST /v1/jobs HTTP/1.1\nHost: 127.0.0.1\n{auth}Content-Type: application/json\n"
                              f"Content-Length: {300 * 2**20}\n", wait=10)  # fmt: skip
    assert status == 413 and f"limit of {LIMITS.max_json_bytes} bytes" in text
    form = "Content-Type: multipart/form-data; boundary=x\n"
    status, text = server.raw(f"POST /v1/uploads HTTP/1.1\nHost: 127.0.0.1\n{auth}{form}"
                              f"Content-Length: {100 * 2**20}\n")  # fmt: skip
    assert status == 413 and str(LIMITS.body_bytes("/v1/uploads")) in text
    # no Content-Length: counted as it streams, cut off at the limit
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(8)) + b"0\r\n\r\n"
    status, text = server.raw(f"POST /v1/jobs HTTP/1.1\nHost: 127.0.0.1\n{auth}Content-Type: application/json\n"
                              "Transfer-Encoding: chunked\n", body)  # fmt: skip
    assert status == 413 and "over this route's limit" in text


def test_a_poisoned_prompt_is_refused_and_cannot_fail_other_jobs(tmp_path):
    """A lone surrogate: 422 at the edge (before: stored, then it failed its whole batch, and every listing
    answered 500). As defence in depth, one such job already in the store among seven good ones: the seven
    finish, it fails, and the listings still answer."""
    app = create_app(tmp_path / "d", _nano, models=["nano"], limits=LIMITS)
    client = TestClient(app, base_url="http://127.0.0.1")
    for field, text, message in (("prompt", "a\ud800b", "lone surrogate (U+D800) at 1"),
                                 ("prompt", "a\x00b", "NUL character"),
                                 ("prompt", "x" * 2001, "2001 characters; at most 2000"),
                                 ("negative_prompt", "y" * 3000, "negative_prompt has 3000 characters")):  # fmt: skip
        body = {"model": "nano", "prompt": "a red circle", field: text}
        r = client.post("/v1/jobs", content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and message in r.json()["detail"], (field, r.text)

    settings = {"prompt": "a red circle", "negative_prompt": None, "width": 128, "height": 128, "steps": 2,
                "guidance": 1.0, "guidance_interval": None, "seed": 0, "num_images": 1, "refs": [],
                "prompt_upsampling": False}  # fmt: skip
    store = app.state.store
    poisoned = store.add("nano", GenerationSettings.from_json(settings | {"prompt": "a\ud800b"}), 2).id  # unchecked
    good = [store.add("nano", GenerationSettings.from_json(settings | {"seed": i}), 2).id for i in range(1, 8)]
    with TestClient(app, base_url="http://127.0.0.1") as running:
        deadline = time.monotonic() + 300
        while any(store.get(i).status not in ("done", "failed") for i in [poisoned, *good]):
            assert time.monotonic() < deadline, "jobs did not finish"
            time.sleep(0.1)
        assert [store.get(i).status for i in good] == ["done"] * 7 and store.get(poisoned).status == "failed"
        assert running.get("/v1/jobs").status_code == 200 and running.get(f"/v1/jobs/{poisoned}").status_code == 200


def test_only_known_host_names_are_served_and_without_a_token_only_the_same_origin(tmp_path):
    """A request for another Host name (DNS rebinding) is refused, with or without a token; without one, so
    is a cross-origin POST from a page elsewhere (before: both were served); the server's own page and plain
    clients work; `--allowed-host` adds names ("*": any)."""
    with Server(tmp_path / "d") as s:
        status, text = s.raw("GET /v1/jobs HTTP/1.1\nHost: attacker.example\n")
        assert status == 400 and "attacker.example" in text and "--allowed-host" in text
        assert s.raw(f"GET /v1/jobs HTTP/1.1\nHost: localhost:{s.port}\n")[0] == 200
        assert s.raw(f"GET /v1/jobs HTTP/1.1\nHost: [::1]:{s.port}\n")[0] == 200
        form = '--x\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--x--\r\n'
        head = (f"POST /v1/images/edits HTTP/1.1\nHost: 127.0.0.1:{s.port}\nContent-Length: {len(form)}\n"
                "Content-Type: multipart/form-data; boundary=x\n")  # fmt: skip
        status, text = s.raw(head + "Origin: https://evil.example\n", form.encode())
        assert status == 403 and "cross-origin" in text
        assert s.raw(head + f"Origin: http://127.0.0.1:{s.port}\n", form.encode())[0] == 422  # its own page: on
    with Server(tmp_path / "e", allowed_hosts=["studio.lan"]) as s:
        assert s.raw("GET /v1/jobs HTTP/1.1\nHost: studio.lan\n")[0] == 200
    auth = f"Authorization: Bearer {TOKEN}\n"
    with Server(tmp_path / "f", token=TOKEN) as s:
        assert s.raw(f"GET /v1/jobs HTTP/1.1\nHost: attacker.example\n{auth}")[0] == 400
    with Server(tmp_path / "g", token=TOKEN, allowed_hosts=["*"]) as s:  # behind a proxy that rewrites Host
        assert s.raw(f"GET /v1/jobs HTTP/1.1\nHost: anything.example\n{auth}")[0] == 200


def test_the_bearer_scheme_is_case_insensitive_and_sizes_are_strict(tmp_path):
    client = TestClient(create_app(tmp_path / "d", _nano, token=TOKEN, models=["nano"], limits=LIMITS), base_url=LOCAL)
    for scheme in ("Bearer", "bearer", "BEARER"):  # before: only "Bearer" (RFC 9110: case-insensitive)
        assert client.get("/v1/models", headers={"Authorization": f"{scheme} {TOKEN}"}).status_code == 200
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = client.post("/v1/jobs", json={"prompt": "p", "width": 0, "height": 128}, headers=auth)
    assert r.status_code == 422 and "width 0 is out of range" in r.text  # before: silently 128
    for size in ("0x0", " 128 x 128 ", "1_28x1_28", "١٢٨x١٢٨", "128x128x1", "128X128"):
        r = client.post("/v1/images/generations", json={"prompt": "p", "size": size}, headers=auth)
        assert r.status_code == 422 and "is not WIDTHxHEIGHT" in r.text, (size, r.text)


def _png(color, size=(128, 128)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_the_official_openai_client_works_against_the_server(server):
    """generate, edit with one and with two images, list and retrieve models, an error that is not retried
    (before: image=[a, b] was refused, models.retrieve was 404, stream=True answered nothing, URLs were
    relative), and a failed generation answered without a retry (before: 500, retried twice: three jobs)."""
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=2)
    out = client.images.generate(model="nano", prompt="a red circle", size="128x128", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))).size == (128, 128)
    url = client.images.generate(model="nano", prompt="a blue square", response_format="url").data[0].url
    assert url.startswith(f"{server.url}/v1/images/") and url.endswith(".png")
    one = client.images.edit(model="nano", image=("a.png", _png("red")), prompt="like this", n=1)
    two = client.images.edit(model="nano", image=[("a.png", _png("red")), ("b.png", _png("blue", (160, 128)))],
                             prompt="both", response_format="b64_json")  # fmt: skip
    assert len(one.data) == 1 and len(two.data) == 1
    assert [m.id for m in client.models.list()] == ["nano"] and client.models.retrieve("nano").id == "nano"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("klein-4b")
    with pytest.raises(openai.BadRequestError, match="stream=true is not supported"):
        client.images.generate(model="nano", prompt="p", stream=True)
    with pytest.raises(openai.UnprocessableEntityError, match="steps 500 is out of range"):
        client.images.generate(model="nano", prompt="p", extra_body={"steps": 500})

    before = len(server.app.state.store.list(500, None))
    server.app.state.worker.loader = lambda model_id: (_ for _ in ()).throw(RuntimeError("out of memory"))
    server.app.state.worker.model_id = None  # the next job loads again, and fails
    with pytest.raises(openai.InternalServerError, match="generation failed: out of memory"):
        client.images.generate(model="nano", prompt="fails")
    assert len(server.app.state.store.list(500, None)) == before + 1  # one job: the client did not retry


def test_an_edit_refused_for_its_fields_writes_no_file(tmp_path):
    """n=1000: a 422 before any upload is written (before: the images were stored first, 144 MB for one call)."""
    app = create_app(tmp_path / "d", _nano, models=["nano"], limits=LIMITS)
    client = TestClient(app, base_url="http://127.0.0.1")
    files = [("image", ("a.png", _png("red"), "image/png"))] * 3
    for data, message in (({"prompt": "p", "n": "1000"}, "n 1000 is out of range 1..4"),
                          ({"prompt": "p", "model": "dev"}, "model 'dev' is not served here"),
                          ({"prompt": "a\x00"}, "NUL character")):  # fmt: skip
        r = client.post("/v1/images/edits", files=files, data=data)
        assert r.status_code == 422 and message in r.json()["detail"], r.text
    assert list(app.state.store.refs_dir.iterdir()) == []
    broken = [*files[:2], ("image", ("b.png", b"not an image", "image/png"))]  # the third upload is refused
    r = client.post("/v1/images/edits", files=broken, data={"prompt": "p"})
    assert r.status_code == 415 and list(app.state.store.refs_dir.iterdir()) == []  # (two were stored first)
    r = client.post("/v1/images/edits", files=files[:1], data={"prompt": "p", "size": "100x96"})  # job refused
    assert r.status_code == 422 and "multiple of 16" in r.json()["detail"], r.text
    assert list(app.state.store.refs_dir.iterdir()) == []  # what it stored is dropped (was kept a day)


def test_a_client_that_goes_away_cancels_its_queued_job(server):
    """Before: the job of a request whose client had gone ran anyway."""
    store, worker = server.app.state.store, server.app.state.worker
    release = threading.Event()
    worker.loader = lambda model_id: (release.wait(60), _nano(model_id))[1]  # the first job holds the worker
    worker.model_id = None

    def post(prompt: str) -> socket.socket:
        body = json.dumps({"model": "nano", "prompt": prompt, "size": "128x128"}).encode()
        s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        s.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        return s

    def job(prompt: str, status: str):
        deadline = time.monotonic() + 60
        while True:
            found = [j for j in store.list(500, None) if j.settings.prompt == prompt and j.status == status]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no {status} job for {prompt!r}"
            time.sleep(0.05)

    first = post("holds the worker")
    job("holds the worker", "running")
    gone = post("nobody waits for this")
    queued = job("nobody waits for this", "queued")
    gone.close()
    assert job("nobody waits for this", "cancelled").id == queued.id
    release.set()
    answer = b""
    while b"b64_json" not in answer:
        chunk = first.recv(65536)
        assert chunk, "the first request got no answer"
        answer += chunk
    first.close()
    assert answer.startswith(b"HTTP/1.1 200")


def _jpeg(size=(512, 512)) -> bytes:
    import numpy as np

    buf = io.BytesIO()  # noise: what grew 6x when it was stored as PNG
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_uploads_keep_their_encoding_expire_and_count_against_a_disk_quota(tmp_path):
    """A JPEG is stored as the bytes sent (before: re-encoded as a PNG ~6x larger) and used as a reference;
    uploads no queued or running job names are deleted after the TTL; a disk quota turns new uploads and
    jobs away with 507; DELETE /v1/jobs/{id} removes a finished job and its images."""
    app = create_app(tmp_path / "d", _nano, models=["nano"], limits=Limits(max_side=256, upload_ttl_s=3600))
    store = app.state.store
    with TestClient(app, base_url="http://127.0.0.1") as client:
        photo = _jpeg()
        ref = client.post("/v1/uploads", files={"file": ("p.jpg", photo, "image/jpeg")}).json()["id"]
        assert store.ref_path(ref).read_bytes() == photo and store.ref_path(ref).suffix == ".jpg"
        job = client.post("/v1/jobs", json={"model": "nano", "prompt": "p", "refs": [ref], "steps": 1}).json()
        deadline = time.monotonic() + 120
        while (done := client.get(f"/v1/jobs/{job['id']}").json())["status"] != "done":
            assert time.monotonic() < deadline and done["status"] in ("queued", "running"), done
            time.sleep(0.05)
        image = store.image_path(done["images"][0].split("/")[-1].removesuffix(".png"))
        assert json.loads(Image.open(image).info["flux2"])["refs"]  # the JPEG was the job's reference

        old = client.post("/v1/uploads", files={"file": ("o.png", _png("red"), "image/png")}).json()["id"]
        past = time.time() - 7200
        for r in (ref, old):
            __import__("os").utime(store.ref_path(r), (past, past))
        client.post("/v1/uploads", files={"file": ("n.png", _png("blue"), "image/png")})  # expiry runs at uploads
        assert store.ref_path(ref) is None and store.ref_path(old) is None

        r = client.delete(f"/v1/jobs/{job['id']}")
        assert (
            r.status_code == 200 and image.exists() is False and client.get(f"/v1/jobs/{job['id']}").status_code == 404
        )
        assert client.delete(f"/v1/jobs/{job['id']}").status_code == 404

    used = store.disk_bytes()
    quota = used + len(photo) - 1  # the photo fits the quota, not what is left of it
    tight = create_app(tmp_path / "d", _nano, models=["nano"], limits=Limits(max_disk_bytes=quota))
    client = TestClient(tight, base_url="http://127.0.0.1")  # no worker: jobs stay queued
    r = client.post("/v1/uploads", files={"file": ("p.jpg", photo, "image/jpeg")})
    assert (
        r.status_code == 507
        and f"disk quota reached: {used} bytes of images and uploads, at most {quota}" in r.json()["detail"]
    )
    queued = client.post("/v1/jobs", json={"model": "nano", "prompt": "p"}).json()["id"]  # fits: no new bytes yet
    assert client.delete(f"/v1/jobs/{queued}").status_code == 409  # queued: cancel it first
    client.post(f"/v1/jobs/{queued}/cancel")
    assert client.delete(f"/v1/jobs/{queued}").status_code == 200
    over = create_app(tmp_path / "d", _nano, models=["nano"], limits=Limits(max_disk_bytes=max(used - 1, 1)))
    r = TestClient(over, base_url="http://127.0.0.1").post("/v1/jobs", json={"model": "nano", "prompt": "p"})
    assert r.status_code == 507 and "DELETE /v1/jobs/{id}" in r.json()["detail"]
    small = create_app(tmp_path / "d", _nano, models=["nano"], limits=Limits(max_disk_bytes=100))
    r = TestClient(small, base_url="http://127.0.0.1").post(
        "/v1/uploads", files={"file": ("p.jpg", photo, "image/jpeg")}
    )
    assert r.status_code == 507 and "more than the server's whole disk quota (100 bytes)" in r.json()["detail"]


def test_no_server_path_reaches_a_client_and_old_jobs_can_expire(tmp_path):
    """Before: a job's settings held the LoRA folder's absolute path, and errors named server files."""
    lora_dir = tmp_path / "secret" / "loras"
    lora_dir.mkdir(parents=True)
    (lora_dir / "broken.safetensors").write_bytes(b"truncated")  # its loading error names the file
    app = create_app(tmp_path / "d", _nano, models=["nano"], limits=LIMITS, lora_dir=lora_dir)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        job = client.post("/v1/jobs", json={"prompt": "p", "loras": [["broken", 0.5]], "steps": 1}).json()
        deadline = time.monotonic() + 120
        while (job := client.get(f"/v1/jobs/{job['id']}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        listing = client.get("/v1/jobs").text
        assert job["status"] == "failed" and job["settings"]["loras"] == [["broken", 0.5]]
        assert str(tmp_path) not in json.dumps(job) + listing and "secret" not in json.dumps(job) + listing
        assert job["error"].startswith("broken.safetensors is not a readable safetensors file")
        stored = app.state.store.get(job["id"])  # the row keeps what the worker needs
        assert stored.loras[0][0] == str(lora_dir / "broken.safetensors") and str(lora_dir) in stored.error

    keep = create_app(tmp_path / "d", _nano, models=["nano"], limits=Limits(keep_finished_s=0))
    client = TestClient(keep, base_url="http://127.0.0.1")
    client.post("/v1/jobs", json={"prompt": "p"})  # a new job: finished ones past the retention go
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404


def test_uploads_are_decoded_off_the_event_loop(tmp_path, monkeypatch):
    """While an upload is being decoded, the server still answers (before: the decode ran on the event loop,
    and /health waited for it)."""
    import httpx

    from flux2studio.serve import uploads as app_module

    started, release, answers = threading.Event(), threading.Event(), []
    check = app_module._check_image

    def slow(raw, limits):
        started.set()
        release.wait(60)
        return check(raw, limits)

    monkeypatch.setattr(app_module, "_check_image", slow)
    with Server(tmp_path / "d") as s:
        files = {"file": ("a.png", _png("red"), "image/png")}
        upload = threading.Thread(
            target=lambda: answers.append(httpx.post(f"{s.url}/v1/uploads", files=files, timeout=60))
        )
        upload.start()
        assert started.wait(30)
        try:
            assert httpx.get(f"{s.url}/health", timeout=20).status_code == 200  # while the decode is held
        finally:
            release.set()
            upload.join(60)
        assert answers[0].status_code == 200
    client = TestClient(create_app(tmp_path / "e", _nano, models=["nano"], limits=LIMITS), base_url=LOCAL)
    r = client.post("/v1/jobs", json={"prompt": "p", "loras": [["x" * 10**5, 1.0]]})  # before: 500 (name too long)
    assert r.status_code == 422 and "unknown LoRA" in r.text and len(r.text) < 1000
    # what a refusal quotes back is cut short (before: a 10 MB model name came back in the error, twice)
    r = client.post("/v1/images/edits", files={"image": ("a.png", _png("red"), "image/png")},
                    data={"prompt": "p", "model": "m" * 10**6})  # fmt: skip
    assert r.status_code == 422 and "is not served here" in r.text and len(r.text) < 1000


def test_a_body_sent_too_slowly_is_cut_off():
    """uvicorn has no body timeout: 20 uploads sending a byte a second stayed open for as long as they liked."""
    import asyncio

    from starlette.exceptions import HTTPException

    from flux2studio.serve.guard import _counted

    async def a_byte_a_while() -> dict:
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def read_all(receive) -> None:
        while (await receive()).get("more_body"):
            pass

    with pytest.raises(HTTPException) as e:  # 1 byte a 50 ms, at least 1 KiB/s after 0.2 s
        asyncio.run(read_all(_counted(a_byte_a_while, 10**6, grace=0.2, rate=1024)))
    assert e.value.status_code == 408 and "request body too slow" in e.value.detail

    async def whole_then_wait() -> dict:  # a body in one message; later receives (a disconnect) are not timed
        whole_then_wait.calls += 1
        if whole_then_wait.calls > 1:
            await asyncio.sleep(0.3)
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": b"{}", "more_body": False}

    whole_then_wait.calls = 0

    async def body_then_disconnect(receive) -> str:
        await receive()
        return (await receive())["type"]

    assert asyncio.run(body_then_disconnect(_counted(whole_then_wait, 100, grace=0.1, rate=1024))) == "http.disconnect"


def test_a_client_slow_to_send_its_headers_is_cut_off(tmp_path):
    """A request head sent a byte at a time, or never: 408 and closed after the deadline (before: uvicorn kept
    such connections open forever); whole heads, and a second request on the same connection, are served."""

    def answer(sock: socket.socket) -> bytes:
        sock.settimeout(60)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data

    with Server(tmp_path / "d", head_timeout=1.0) as s:
        with socket.create_connection(("127.0.0.1", s.port)) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\nHo")
            assert answer(slow).startswith(b"HTTP/1.1 408")
        with socket.create_connection(("127.0.0.1", s.port)) as silent:
            assert answer(silent).startswith(b"HTTP/1.1 408")
        with socket.create_connection(("127.0.0.1", s.port)) as kept:
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            kept.settimeout(60)
            assert kept.recv(65536).startswith(b"HTTP/1.1 200")
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert kept.recv(65536).startswith(b"HTTP/1.1 200")


def test_checks_hold_under_a_root_path_and_for_refusals_of_bad_json(tmp_path):
    """Mounted under a prefix (uvicorn --root-path, a Ray route prefix) the token and limits still apply (a
    review found /flux/v1/jobs open); a lone surrogate that FastAPI's own 422 quotes back is a 422, not a 500."""
    app = create_app(tmp_path / "d", _nano, token=TOKEN, models=["nano"], limits=LIMITS)
    client = TestClient(app, base_url=LOCAL, root_path="/flux")
    assert client.post("/flux/v1/jobs", json={"prompt": "p"}).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    body = json.dumps({"negative_prompt": "\ud800"})  # prompt missing: the 422 quotes the input
    r = TestClient(app, base_url=LOCAL).post("/v1/jobs", content=body, headers=auth)
    assert r.status_code == 422 and "prompt" in r.json()["error"]["message"]


def test_odd_numbers_fields_and_images_get_a_4xx_before_queueing_and_every_answer_is_hardened(tmp_path):
    """Found by trying the server as a hostile client would, each answered before the fix as noted: NaN,
    Infinity and 1e400 (Python's JSON reader takes them) in a field (500: the 422 quoting them back was not
    JSON); a misspelt field (ignored: the default ran); a 1x1 reference (queued, then failed; on the OpenAI
    route a 500); `n` out of range named `num_images`; a camera JPEG (MPO) refused as "not JPEG"; the guard's
    refusals without OpenAI's `error` or CORS headers for an allowed origin; no nosniff or framing policy."""
    app = create_app(tmp_path / "d", _nano, token=TOKEN, models=["nano"], limits=LIMITS, cors_origins=["http://app"])
    client = TestClient(app, base_url=LOCAL)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    jobs = app.state.store
    for body in ('{"prompt":"p","width":NaN}', '{"prompt":"p","seed":-Infinity}', '{"prompt":"p","steps":1e400}',
                 '{"prompt":"p","guidance":NaN}', '{"prompt":"p","loras":[["x",Infinity]]}'):  # fmt: skip
        r = client.post("/v1/jobs", content=body, headers=auth | {"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["message"], (body, r.text)
    r = client.post("/v1/images/generations", content='{"prompt":"p","n":NaN}',
                    headers=auth | {"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("body.n:")
    r = client.post("/v1/jobs", json={"prompt": "p", "step": 50}, headers=auth)
    assert r.status_code == 422 and "body.step: Extra inputs are not permitted" in r.json()["error"]["message"]
    r = client.post("/v1/images/generations", json={"prompt": "p", "n": 10}, headers=auth)
    assert r.status_code == 422 and "n 10 is out of range 1..4" in r.text
    tiny = client.post("/v1/uploads", files={"file": ("t.png", _png("red", (1, 1)), "image/png")}, headers=auth)
    r = client.post("/v1/jobs", json={"prompt": "p", "refs": [tiny.json()["id"]]}, headers=auth)
    assert r.status_code == 422 and "reference 0 is 1x1: both sides must be at least 64 px" in r.text
    r = client.post("/v1/images/edits", files={"image": ("t.png", _png("red", (1, 1)), "image/png")},
                    data={"prompt": "p"}, headers=auth)  # fmt: skip
    assert r.status_code == 422 and "reference 0 is 1x1" in r.text
    assert jobs.list(500, None) == []  # nothing was queued
    assert app.state.admission.reference_sizes([tiny.json()["id"]], local=False) == [(1, 1)]  # the API's rules
    photo, second = Image.new("RGB", (300, 200), "red"), Image.new("RGB", (300, 200), "blue")
    buf = io.BytesIO()
    photo.save(buf, format="MPO", save_all=True, append_images=[second])  # how phones write their JPEGs
    r = client.post("/v1/uploads", files={"file": ("p.jpg", buf.getvalue(), "image/jpeg")}, headers=auth)
    assert r.status_code == 200, r.text
    job = client.post("/v1/jobs", json={"prompt": "p", "refs": [r.json()["id"]]}, headers=auth)
    assert job.status_code == 202 and job.headers["location"] == f"/v1/jobs/{job.json()['id']}"
    assert (job.json()["settings"]["width"], job.json()["settings"]["height"]) == (256, 160)  # the photo in 256 px
    refused = client.get("/v1/models", headers={"Origin": "http://app"})  # no token: the guard answers
    assert refused.status_code == 401 and refused.json()["error"]["message"] == "missing or wrong bearer token"
    assert refused.headers["access-control-allow-origin"] == "http://app"
    assert "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": "http://evil"}).headers
    for r in (refused, client.get("/", headers=auth), client.get("/v1/models", headers=auth)):
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "SAMEORIGIN"
