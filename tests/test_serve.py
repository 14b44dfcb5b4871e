"""The HTTP server on a tiny klein folder: jobs, limits, auth, uploads, OpenAI routes, persistence.

Servers bind 127.0.0.1 only; loops are bounded in count and time."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from flux2studio.loading import load
from flux2studio.serve.app import create_app
from flux2studio.serve.limits import Limits

LOCAL = "http://127.0.0.1"  # the Host the server serves without a token (guard.py: loopback names)


def _loader(folder):
    return lambda model_id: load(model_id, weights=folder, device="cpu", dtype="fp32", resident=True)


@pytest.fixture
def client(klein_folder, tmp_path):
    _, folder = klein_folder
    app = create_app(tmp_path / "data", _loader(folder), models=["klein-4b"], limits=Limits(max_side=256))
    with TestClient(app, base_url=LOCAL) as c:
        yield c


def _wait(client, job_id, timeout=120, headers=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished in {timeout}s")


def test_job_lifecycle_image_and_metadata(client):
    r = client.post("/v1/jobs", json={"model": "klein-4b", "prompt": "a red circle", "width": 64, "height": 96,
                                      "steps": 2, "seed": 4, "num_images": 2})  # fmt: skip
    assert r.status_code == 202, r.text
    job = _wait(client, r.json()["id"])
    assert job["status"] == "done" and job["progress"] == {"step": 2, "steps": 2}
    assert len(job["images"]) == 2
    png = client.get(job["images"][1])
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (64, 96) and json.loads(image.info["flux2"])["seed"] == 5
    assert job["id"] in [j["id"] for j in client.get("/v1/jobs").json()["data"]]  # the gallery


def test_limits_are_checked_before_queueing(client):
    base = {"model": "klein-4b", "prompt": "p", "width": 64, "height": 64}
    cases = [
        ({"width": 4096}, "width 4096 is out of range 1..256"),
        ({"width": 100}, "width 100 is not a multiple of 16"),
        ({"steps": 0}, "steps 0 is out of range 1..100"),
        ({"num_images": 9}, "num_images 9 is out of range 1..4"),
        ({"prompt": "x" * 3000}, "prompt has 3000 characters; at most 2000"),
        ({"model": "dev"}, "model 'dev' is not served here"),
        ({"guidance": 3.0}, "guidance-distilled"),
        ({"refs": ["../../etc/passwd"]}, "unknown reference id"),
    ]
    for change, message in cases:
        r = client.post("/v1/jobs", json=base | change)
        assert r.status_code == 422 and message in r.json()["detail"], (change, r.text)
    assert client.get("/health").json()["queued"] == 0


def test_loras_from_the_lora_dir(klein_folder, tmp_path):
    """A job names LoRAs in --lora-dir with a scale each: the image equals the Python API's with the same two
    LoRAs, the next job without them is the plain image again, and bad names or scales are refused before
    queueing."""
    _, folder = klein_folder
    pipe = _loader(folder)("klein-4b")
    g = torch.Generator().manual_seed(0)
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    for name, layer in (("style", "double_blocks.0.img_attn.qkv"), ("face", "single_blocks.0.linear1")):
        linear = pipe.transformer.get_submodule(layer)
        save_file({f"diffusion_model.{layer}.lora_A.weight": torch.randn(4, linear.in_features, generator=g),
                   f"diffusion_model.{layer}.lora_B.weight": torch.randn(linear.out_features, 4, generator=g)},
                  str(lora_dir / f"{name}.safetensors"))  # fmt: skip
    plain = np.asarray(pipe("a red circle", seed=3, size=(64, 64), steps=2)[0])
    pipe.set_loras([(str(lora_dir / "style.safetensors"), 0.5), (str(lora_dir / "face.safetensors"), -1.0)])
    styled = np.asarray(pipe("a red circle", seed=3, size=(64, 64), steps=2)[0])
    assert not np.array_equal(plain, styled)

    app = create_app(tmp_path / "data", _loader(folder), models=["klein-4b"], lora_dir=lora_dir)
    base = {"model": "klein-4b", "prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "seed": 3}
    with TestClient(app, base_url=LOCAL) as client:
        two = {"loras": [["style", 0.5], ["face", -1.0]]}
        ids = [client.post("/v1/jobs", json=base | extra).json()["id"] for extra in (two, {})]
        jobs = [_wait(client, i) for i in ids]
        images = [Image.open(io.BytesIO(client.get(job["images"][0]).content)) for job in jobs]
        assert np.array_equal(np.asarray(images[0]), styled) and np.array_equal(np.asarray(images[1]), plain)
        assert [(lo["file"], lo["scale"]) for lo in json.loads(images[0].info["flux2"])["loras"]] == [
            ("style.safetensors", 0.5),
            ("face.safetensors", -1.0),
        ]
        for loras, message in (([["../loras/style", 1.0]], "unknown LoRA '../loras/style'"),
                               ([["nope", 1.0]], "unknown LoRA 'nope'"),
                               ([["style", 20.0]], "LoRA 'style' scale 20.0 is out of range -8..8"),
                               ([["style", 1.0]] * 5, "5 LoRAs; at most 4")):  # fmt: skip
            r = client.post("/v1/jobs", json=base | {"loras": loras})
            assert r.status_code == 422 and message in r.json()["detail"], (loras, r.text)


def test_queue_is_bounded(klein_folder, tmp_path):
    _, folder = klein_folder
    app = create_app(tmp_path / "d", _loader(folder), models=["klein-4b"], limits=Limits(max_queue=2))
    client = TestClient(app, base_url=LOCAL)  # no lifespan: the worker is not started, so jobs stay queued
    body = {"model": "klein-4b", "prompt": "p", "width": 64, "height": 64}
    assert [client.post("/v1/jobs", json=body).status_code for _ in range(2)] == [202, 202]
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 429 and r.headers["retry-after"] == "10"
    queued = client.get("/v1/jobs").json()["data"][0]["id"]
    assert client.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "cancelled"


def test_bearer_token(klein_folder, tmp_path):
    _, folder = klein_folder
    client = TestClient(
        create_app(tmp_path / "d", _loader(folder), token="s3cret", models=["klein-4b"]), base_url=LOCAL
    )
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "klein-4b"
    assert client.get("/health").status_code == 200  # health stays open for load balancers


def test_uploads_are_checked_and_files_are_ids_only(client):
    assert client.post("/v1/uploads", files={"file": ("x.png", b"not an image")}).status_code == 415
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # tiny file, 400 megapixels decoded
    r = client.post("/v1/uploads", files={"file": ("bomb.png", bomb.getvalue())})
    assert r.status_code == 413 and "over" in r.json()["detail"]
    for path in ("/v1/images/..%2Fjobs.sqlite3", "/v1/images/../jobs.sqlite3", "/v1/images/0" * 3):
        assert client.get(path).status_code == 404


def test_openai_generations_and_edits(client):
    r = client.post("/v1/images/generations", json={"model": "klein-4b", "prompt": "a fox", "size": "64x64",
                                                    "n": 1, "steps": 1})  # fmt: skip
    assert r.status_code == 200, r.text
    png = base64.b64decode(r.json()["data"][0]["b64_json"])
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    r = client.post(
        "/v1/images/generations", json={"prompt": "a fox", "size": "64x64", "response_format": "url", "steps": 1}
    )  # no model: the one served (was "nano is not served")
    assert r.status_code == 200, r.text
    assert client.get(r.json()["data"][0]["url"]).status_code == 200
    ref = io.BytesIO()
    Image.new("RGB", (96, 64), "blue").save(ref, format="PNG")
    r = client.post("/v1/images/edits", files=[("image", ("ref.png", ref.getvalue(), "image/png"))],
                    data={"model": "klein-4b", "prompt": "make it red"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size == (96, 64)


def test_progress_events_stream_until_done(client):
    job = client.post("/v1/jobs", json={"model": "klein-4b", "prompt": "p", "width": 64, "height": 64,
                                        "steps": 3}).json()  # fmt: skip
    events = []
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["status"] == "done"
    steps = [e["progress"]["step"] for e in events if e["status"] == "running"]
    assert steps == sorted(steps)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(folder, data, port):
    cmd = [sys.executable, "-m", "flux2studio.cli", "serve", "--port", str(port), "--data", str(data),
           "--model", f"klein-4b={folder}", "--dtype", "fp32", "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    import httpx

    for _ in range(300):  # up to 30 s to start
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(proc.stderr.read().decode())


def test_kill_9_loses_no_job(klein_folder, tmp_path):
    import httpx

    _, folder = klein_folder
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(folder, tmp_path / "data", port)
    try:
        first = httpx.post(f"{url}/v1/jobs", json={"model": "klein-4b", "prompt": "done before the crash",
                                                   "width": 64, "height": 64, "steps": 1}).json()  # fmt: skip
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/v1/jobs/{first['id']}").json()["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        slow = [httpx.post(f"{url}/v1/jobs", json={"model": "klein-4b", "prompt": f"slow {i}", "width": 256,
                                                   "height": 256, "steps": 40}).json() for i in range(2)]  # fmt: skip
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/v1/jobs/{slow[0]['id']}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    proc = _serve(folder, tmp_path / "data", port)
    try:
        deadline = time.monotonic() + 240
        for job in slow:
            while (status := httpx.get(f"{url}/v1/jobs/{job['id']}").json()["status"]) != "done":
                assert status in ("queued", "running") and time.monotonic() < deadline, status
                time.sleep(0.2)
        listed = {j["id"]: j["status"] for j in httpx.get(f"{url}/v1/jobs").json()["data"]}
        assert listed[first["id"]] == "done" and all(listed[j["id"]] == "done" for j in slow)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_refuses_public_bind_without_token():
    run = subprocess.run([sys.executable, "-m", "flux2studio.cli", "serve", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2 and "refusing to bind 0.0.0.0 without an API token" in run.stderr


def test_a_host_name_to_bind_is_taken_like_an_address(capsys):
    """`--host studio.lan` (before: "does not appear to be an IPv4 or IPv6 address") needs a token like any
    address that is not loopback."""
    from flux2studio.cli import main

    assert main(["serve", "--host", "studio.lan"]) == 2
    assert "refusing to bind studio.lan without an API token" in capsys.readouterr().err


def test_embedded_model_through_the_api(tmp_path):
    """The default server: the embedded nano, no weights given, a real 128x128 image back."""
    loader = lambda model_id: load(model_id, device="cpu", resident=True)  # noqa: E731
    with TestClient(create_app(tmp_path / "data", loader), base_url=LOCAL) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["nano", "nano-base"]
        job = client.post("/v1/jobs", json={"prompt": "a red circle on a white background", "seed": 1}).json()
        done = _wait(client, job["id"])
        assert done["status"] == "done" and done["settings"]["steps"] == 4
        image = Image.open(io.BytesIO(client.get(done["images"][0]).content))
        meta = json.loads(image.info["flux2"])
        assert image.size == (128, 128) and meta["model"] == "nano"
        assert done["settings"]["guidance_interval"] is None  # nano runs no CFG
        planned = meta["upsampled_prompt"]  # the size and the cell stated, the background kept
        assert done["settings"]["prompt_upsampling"] is True and "white" in planned and " red circle " in planned
        assert ("small" in planned or "large" in planned) and planned != meta["prompt"]
        job = client.post("/v1/jobs", json={"prompt": "a red circle", "seed": 1, "prompt_upsampling": False}).json()
        done = _wait(client, job["id"])
        assert done["settings"]["prompt_upsampling"] is False
        image = Image.open(io.BytesIO(client.get(done["images"][0]).content))
        assert "upsampled_prompt" not in json.loads(image.info["flux2"])

        # nano-base: the job keeps the interval it ran with (the model's default when none is given)
        ask = {"model": "nano-base", "prompt": "a red circle", "seed": 1, "steps": 3}
        for given, kept in ((None, [0.0, 1.0]), ([0, 0.9], [0.0, 0.9])):
            job = client.post("/v1/jobs", json={**ask, "guidance_interval": given}).json()
            done = _wait(client, job["id"])
            assert done["status"] == "done" and done["settings"]["guidance_interval"] == kept
            image = Image.open(io.BytesIO(client.get(done["images"][0]).content))
            assert json.loads(image.info["flux2"])["guidance_interval"] == kept
        r = client.post("/v1/jobs", json={**ask, "guidance_interval": [0.9, 0.5]})
        assert r.status_code == 422 and "guidance interval (0.9, 0.5) must be noise levels" in r.json()["detail"]


def test_step_previews_while_running(tmp_path):
    """Each step's x0 estimate is decoded into a small JPEG while the job runs, and dropped when it ends."""
    loader = lambda model_id: load(model_id, device="cpu", resident=True)  # noqa: E731
    with TestClient(create_app(tmp_path / "data", loader), base_url=LOCAL) as client:
        worker = client.app.state.worker
        seen = []
        real = worker._previews

        def spy(pipe, batch, x0, width, height):
            real(pipe, batch, x0, width, height)
            seen.append(client.get(f"/v1/jobs/{batch[0].id}/preview"))

        worker._previews = spy
        worker.preview_every = 1e-9  # every step
        job = client.post("/v1/jobs", json={"model": "nano-base", "prompt": "a blue square", "seed": 2,
                                            "steps": 6, "width": 160, "height": 96}).json()  # fmt: skip
        assert _wait(client, job["id"])["status"] == "done"
        assert len(seen) == 5  # steps 1..5 (the last step is the final image itself)
        preview = Image.open(io.BytesIO(seen[-1].content))
        assert seen[-1].headers["content-type"] == "image/jpeg" and preview.size == (160, 96)
        assert client.get(f"/v1/jobs/{job['id']}/preview").status_code == 204  # dropped once done


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _photo(w: int, h: int) -> Image.Image:
    g = np.random.default_rng(2)
    return Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_inpainting_outpainting_and_image_to_image_jobs(client):
    photo = _photo(96, 64)
    image = client.post("/v1/uploads", files={"file": ("p.png", _png(photo))}).json()["id"]
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (0, 0, 48, 32))
    mask_id = client.post("/v1/uploads", files={"file": ("m.png", _png(mask))}).json()["id"]
    base = {"model": "klein-4b", "prompt": "a red ball", "steps": 2, "seed": 1}
    jobs = {
        "inpaint": client.post("/v1/jobs", json={**base, "image": image, "mask": mask_id, "strength": 0.9}),
        "outpaint": client.post("/v1/jobs", json={**base, "image": image, "expand": [0, 0, 32, 16]}),
        "i2i": client.post("/v1/jobs", json={**base, "image": image}),
    }
    for r in jobs.values():
        assert r.status_code == 202, r.text
    done = {k: _wait(client, r.json()["id"]) for k, r in jobs.items()}
    assert all(j["status"] == "done" for j in done.values()), done
    assert done["inpaint"]["settings"]["strength"] == 0.9 and done["i2i"]["settings"]["strength"] == 0.75
    assert done["outpaint"]["settings"]["expand"] == [0, 0, 32, 16]
    assert (done["outpaint"]["settings"]["width"], done["outpaint"]["settings"]["height"]) == (128, 80)
    images = {k: Image.open(io.BytesIO(client.get(j["images"][0]).content)) for k, j in done.items()}
    assert images["inpaint"].size == (96, 64) and images["outpaint"].size == (128, 80)
    assert np.array_equal(np.asarray(images["outpaint"])[:64, :96], np.asarray(photo))
    meta = json.loads(images["inpaint"].info["flux2"])["init"]
    assert meta["strength"] == 0.9 and meta["mask"] and meta["image"]

    for body, message in (
        ({**base, "mask": mask_id}, "edit a start image: give image"),
        ({**base, "image": "0" * 32}, "unknown image id"),
        ({**base, "image": image, "strength": 0}, "strength 0.0 is out of range"),
        ({**base, "image": image, "expand": [0, 0, 17, 0]}, "expansion right 17 must be a non-negative multiple"),
        ({**base, "image": image, "mask": client.post("/v1/uploads", files={"file": (
            "b.png", _png(Image.new("L", (96, 64), 0)))}).json()["id"]}, "the mask is all black"),
    ):  # fmt: skip
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 422 and message in r.json()["detail"], (body, r.text)


def test_openai_edits_take_a_mask_with_openais_convention(client):
    photo = _photo(96, 64)
    alpha = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    alpha.paste((0, 0, 0, 0), (48, 0, 96, 64))  # right half transparent: edit it
    files = [("image", ("p.png", _png(photo), "image/png")), ("mask", ("m.png", _png(alpha), "image/png"))]
    r = client.post("/v1/images/edits", files=files, data={"model": "klein-4b", "prompt": "a sunset", "seed": "3"})
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    meta = json.loads(out.info["flux2"])
    assert out.size == (96, 64) and meta["init"]["mask"] and meta["refs"] == []
    job = client.get("/v1/jobs?limit=1").json()["data"][0]
    with Image.open(client.app.state.store.ref_path(job["settings"]["mask"])) as stored:
        stored = stored.copy()
    assert np.asarray(stored)[:, 48:].min() == 255 and np.asarray(stored)[:, :48].max() == 0  # white = repaint
    opaque = [("image", ("p.png", _png(photo), "image/png")), ("mask", ("m.png", _png(photo), "image/png"))]
    r = client.post("/v1/images/edits", files=opaque, data={"model": "klein-4b", "prompt": "a sunset"})
    assert r.status_code == 422 and "mask has no alpha channel" in r.json()["error"]["message"]


def test_a_job_cancelled_and_deleted_while_its_batch_runs_leaves_the_worker_running(tmp_path):
    """A batch's job cancelled, then deleted, mid-batch: the other job goes back to the queue and runs (the
    deleted job's missing row raised in the step callback and again in the one-by-one fallback, which ended the
    worker's thread: nothing ran after it, and /health still said ok)."""
    from flux2studio.serve.store import Store
    from flux2studio.serve.worker import Worker
    from flux2studio.settings import GenerationSettings

    store = Store(tmp_path / "data")
    a, b = (store.add("nano", GenerationSettings("a red circle", size=(64, 64), steps=2, seed=s), 2) for s in (0, 1))
    worker = Worker(store, lambda model_id: load(model_id, device="cpu", dtype="fp32"))
    batch = [store.claim(runner=worker.runner), store.claim(like=a, runner=worker.runner)]
    progress = store.progress

    def cancel_and_delete_b(job_id, *args, **kw):
        if store.get(b.id) is not None:
            assert store.cancel(b.id) and store.delete(b.id)
        progress(job_id, *args, **kw)

    store.progress = cancel_and_delete_b
    worker._run_batch(batch)
    assert store.get(a.id).status == "queued" and store.get(b.id) is None
    assert store.get(a.id).attempts == 0  # a batch-mate's cancel is not a try of its own (3 of them failed it)
    store.progress = progress
    run_batch = worker.execute

    def fails_once(batch):  # an error of ours (not the job's): logged, the job goes back to the queue
        worker.execute = run_batch
        raise RuntimeError("a bug")

    worker.execute = fails_once
    worker.start()
    try:
        for _ in range(3000):  # (a bound, not a timing: the job is done when it is)
            if store.get(a.id).status == "done":
                break
            time.sleep(0.1)
        assert store.get(a.id).status == "done" and all(t.is_alive() for t in worker.threads)
        assert worker.execute is run_batch  # (the failing one ran first)
    finally:
        worker.stop()


def test_a_stopping_server_puts_its_batch_back_without_counting_a_try(tmp_path, caplog):
    """SIGTERM (`run_app` calls `begin_stop`): the batch ends at its next step and goes back to the queue, its
    attempt not counted (three restarts during a long job failed it: 'worker died too often')."""
    from flux2studio.serve.store import Store
    from flux2studio.serve.worker import Worker
    from flux2studio.settings import GenerationSettings

    store = Store(tmp_path / "data")
    job = store.add("nano", GenerationSettings("a red circle", size=(64, 64), steps=3), 3)
    worker = Worker(store, lambda model_id: load(model_id, device="cpu", dtype="fp32"))
    progress = store.progress

    def stop_at_first_step(job_id, *args, **kw):
        progress(job_id, *args, **kw)
        worker.begin_stop()

    store.progress = stop_at_first_step
    for _ in range(3):  # three restarts
        worker._run_batch([store.claim(runner=worker.runner)])
        worker._stop.clear()
    again = store.get(job.id)
    assert (again.status, again.attempts, again.step) == ("queued", 0, 0)
    assert "go back to the queue" in caplog.text


def test_waits_on_a_job_deleted_or_a_server_stopping_answer_in_json(tmp_path):
    """An OpenAI wait and an event stream on a job deleted meanwhile, or while the server stops: JSON answers and
    a last event (were a plain-text 500 and a broken stream: AttributeError on the missing row)."""
    import threading

    app = create_app(tmp_path / "data", lambda model_id: load(model_id))  # no lifespan: the worker never runs
    client = TestClient(app, base_url=LOCAL)
    answers = []

    def wait_on_generation():
        answers.append(client.post("/v1/images/generations", json={"prompt": "a red circle", "size": "64x64"}))

    for end in ("delete", "stop"):
        waiting = threading.Thread(target=wait_on_generation)
        waiting.start()
        while not (jobs := client.get("/v1/jobs").json()["data"]) or jobs[0]["status"] != "queued":
            time.sleep(0.05)  # (a condition: the job is queued when it is)
        job_id = jobs[0]["id"]
        if end == "delete":
            client.post(f"/v1/jobs/{job_id}/cancel")
            assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
        else:
            app.state.worker.begin_stop()
            events = client.get(f"/v1/jobs/{job_id}/events")
        waiting.join(timeout=600)
        r = answers.pop()
        if end == "delete":
            assert r.status_code == 404 and r.json()["error"]["message"] == f"job {job_id} was deleted"
        else:
            assert r.status_code == 503 and r.headers["x-should-retry"] == "false", r.text
            assert f"job {job_id} stays queued" in r.json()["error"]["message"]
            assert "event: restarting" in events.text
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    gone = client.get("/v1/jobs/0123456789abcdef0123456789abcdef/events")
    assert gone.status_code == 404


def test_http_methods_and_paths_answer_as_they_should(client):
    assert client.head("/health").status_code == 200  # (404: the page's files were mounted over "/")
    head = client.head("/v1/models")
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
    assert client.put("/v1/jobs").status_code == 405
    assert client.get("/v1/jobs/..%2f..%2f").headers["content-type"] == "application/json"  # (the page's HTML)
    assert client.get("/nothing").status_code == 404
    assert client.get("/").headers["content-type"].startswith("text/html")
    assert client.get("/studio.js").status_code == 200
    assert client.get("/v1/jobs?status=don").status_code == 422  # (a typo listed nothing)
    assert client.get("/v1/jobs?status=").status_code == 200 and client.get("/index.html").status_code == 200
    job = client.post("/v1/jobs", json={"prompt": "a red circle", "width": 64, "height": 64, "steps": 1}).json()
    assert _wait(client, job["id"])["status"] == "done"
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and "is done: nothing to cancel" in r.json()["detail"]  # (was a 200)
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "size": "auto"})  # OpenAI's default
    assert "width 1024 is out of range 1..256" in r.text  # "auto": the model's own size (here over the test limit)


def test_numbers_must_be_json_numbers(client):
    for body, message in (({"steps": True}, "steps: Value error, must be a number, not bool True"),
                          ({"width": "128"}, "width: Value error, must be a number, not str"),
                          ({"prompt_upsampling": "yes"}, "prompt_upsampling: Input should be a valid boolean"),
                          ({"aspect": "16:9", "width": 256}, "give width and height or aspect, not both")):  # fmt: skip
        r = client.post("/v1/jobs", json={"prompt": "a red circle", **body})
        assert r.status_code == 422 and message in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] is None  # (a check of ours, not one field's)
    r = client.post("/v1/jobs", json={"prompt": "a red circle", "steps": True})
    assert r.json()["error"]["param"] == "steps"  # OpenAI's shape names the field (was always null)
    wide = io.BytesIO()
    Image.new("RGB", (1024, 128)).save(wide, format="PNG")
    ref = client.post("/v1/uploads", files={"file": ("wide.png", wide.getvalue(), "image/png")}).json()["id"]
    r = client.post("/v1/jobs", json={"prompt": "a red circle", "refs": [ref]})  # the size comes from it: say so
    assert "the size was taken from reference 0 (1024x128): give width and height" in r.json()["detail"], r.text
    whole = {"prompt": "a red circle", "width": 128.0, "height": 128, "steps": 1}  # a float that is a whole number
    assert client.post("/v1/jobs", json=whole).status_code == 202, client.post("/v1/jobs", json=whole).text


def test_a_second_server_on_the_same_data_or_port_touches_nothing(tmp_path, klein_folder):
    """It took the first server's running jobs back as crashed ones before failing to bind (three such starts
    failed a job that went on to finish)."""
    from flux2studio.cli import check_port, check_served
    from flux2studio.serve.store import lock_data

    held = lock_data(tmp_path / "data")
    with pytest.raises(RuntimeError, match=rf"in use by another flux2 serve \(pid {os.getpid()}\)"):
        lock_data(tmp_path / "data")
    held.close()
    lock_data(tmp_path / "data").close()  # free again once the first has gone
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{port} .*choose another --port"):
            check_port("127.0.0.1", port)
    (tmp_path / "fake.safetensors").write_text("not weights")
    with pytest.raises(ValueError, match=r"--model nano=.*fake\.safetensors: .*not a readable safetensors file"):
        check_served({"nano": str(tmp_path / "fake.safetensors")}, None)  # (/health said ok, every job failed)
