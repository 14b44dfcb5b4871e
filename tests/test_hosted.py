"""Hosted models (BFL API) against a local fake of the documented contract, on 127.0.0.1; no network.

Covers the request bodies (sizes, seeds, references, flex's steps and guidance, Kontext's aspect ratio),
polling the given polling_url, downloading at once, metadata, every documented failure, and that the key
never shows up in errors, metadata, the job store or on a delivery host."""

import base64
import io
import json
import sqlite3
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fake_bfl import GOOD_KEY, FakeBfl
from flux2studio import hosted
from flux2studio.hosted import ENDPOINTS, BflClient, HostedError, HostedPipeline, check_request
from flux2studio.loading import load
from flux2studio.settings import GenerationSettings

LOCAL = "http://127.0.0.1"  # the Host the server serves without a token (guard.py: loopback names)


@pytest.fixture(scope="module")
def bfl():
    with FakeBfl() as server:
        yield server


def client(bfl, key=GOOD_KEY, **kw):
    return BflClient(key, bfl.url, sleep=lambda s: None, poll_interval=0.001, **kw)


def pipe(bfl, model="pro", key=GOOD_KEY, **kw):
    return HostedPipeline(model, client(bfl, key, **{k: v for k, v in kw.items() if k in ("retries", "max_wait")}),
                          **{k: v for k, v in kw.items() if k not in ("retries", "max_wait")})  # fmt: skip


def submitted(bfl, prompt):
    return [body for method, _, _, body in bfl.requests if method == "POST" and body["prompt"] == prompt]


def test_text_to_image_polls_the_given_url_and_keeps_metadata(bfl):
    first = len(bfl.requests)  # the fake serves the whole module: look at this test's requests only
    images = pipe(bfl)("a lighthouse at dusk", size=(320, 192), seed=7, num_images=2)
    assert [im.size for im in images] == [(320, 192)] * 2
    bodies = submitted(bfl, "a lighthouse at dusk")
    assert [b["seed"] for b in bodies] == [7, 8]
    assert bodies[0] | {"seed": 0} == {"prompt": "a lighthouse at dusk", "seed": 0, "width": 320, "height": 192,
                                       "safety_tolerance": 2, "output_format": "png"}  # fmt: skip
    meta = json.loads(images[1].info["flux2"])
    assert meta["model"] == "pro" and meta["seed"] == 8 and meta["width"] == 320 and meta["device"] == "api"
    assert meta["hosted"]["endpoint"] == "/v1/flux-2-pro" and meta["hosted"]["cost"] == 3.0
    assert len(meta["hosted"]["task_id"]) == 32
    assert GOOD_KEY not in images[0].info["flux2"] + images[0].info["parameters"]
    # the key went to the API (submit and polling) and never to the delivery host
    for method, path, headers, _ in bfl.requests[first:]:
        assert (headers.get("x-key") == GOOD_KEY) == (not path.startswith("/delivery")), (method, path)


def test_references_flex_settings_and_kontext_aspect(bfl, tmp_path):
    refs = [Image.new("RGB", (64 + 16 * i, 64), (i * 60, 0, 0)) for i in range(3)]
    pipe(bfl, "flex", prompt_upsampling=True)("three refs", refs=refs, steps=28, guidance=3.5, size=(256, 256))
    body = submitted(bfl, "three refs")[0]
    assert {"input_image", "input_image_2", "input_image_3"} <= set(body) and "input_image_4" not in body
    decoded = Image.open(io.BytesIO(base64.b64decode(body["input_image_3"])))
    assert decoded.size == (96, 64)
    assert (body["steps"], body["guidance"], body["prompt_upsampling"]) == (28, 3.5, True)
    image = pipe(bfl, "flex", prompt_upsampling=True)("one call", prompt_upsampling=False)[0]  # per call wins
    assert submitted(bfl, "one call")[0]["prompt_upsampling"] is False
    assert json.loads(image.info["flux2"])["hosted"]["prompt_upsampling"] is False

    image = pipe(bfl, "kontext-pro")("make it night", refs=refs[:1], size=(1024, 768))[0]
    body = submitted(bfl, "make it night")[0]
    assert body["aspect_ratio"] == "4:3" and "width" not in body and "input_image" in body
    assert image.size == (64, 48)  # whatever the API returns is what is saved
    # no size: the first reference's aspect (before: 1:1 for Kontext), given as a file and size as text too
    Image.new("RGB", (1600, 1200)).save(tmp_path / "photo.png")
    pipe(bfl, "kontext-pro")("as the photo", refs=[tmp_path / "photo.png"])
    assert submitted(bfl, "as the photo")[0]["aspect_ratio"] == "4:3"
    pipe(bfl, "pro")("as text", size="320x192", refs=[str(tmp_path / "photo.png")])
    assert (submitted(bfl, "as text")[0]["width"], submitted(bfl, "as text")[0]["height"]) == (320, 192)
    settings, _ = check_request(ENDPOINTS["pro"], GenerationSettings("p"), [(4000, 3000)])  # over 4 MP: fitted
    assert settings.size == (2352, 1760)
    with pytest.raises(ValueError, match=r"takes 0\.\.1"):
        pipe(bfl, "kontext-max")("two refs", refs=refs[:2])
    with pytest.raises(ValueError, match="omit steps"):
        pipe(bfl, "pro")("p", steps=10)
    with pytest.raises(ValueError, match=r"steps 80 is out of range 1..50"):
        pipe(bfl, "flex")("p", steps=80)
    with pytest.raises(ValueError, match="4 MP"):
        pipe(bfl, "max")("p", size=(2560, 2048))
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe(bfl, "pro")("p", size=(1000, 1000))


def test_klein_through_the_api_backend(bfl, monkeypatch):
    monkeypatch.setenv("BFL_API_KEY", GOOD_KEY)
    monkeypatch.setenv("BFL_API_URL", bfl.url)
    p = load("klein-4b", backend="api")
    assert isinstance(p, HostedPipeline) and p.endpoint.path == "/v1/flux-2-klein-4b"
    p.client.sleep, p.client.poll_interval = (lambda s: None), 0.001
    assert p("klein via api", size=(128, 128))[0].size == (128, 128)
    with pytest.raises(ValueError, match=r"klein-4b is a hosted model: image, mask .* runs on local models only"):
        p("inpaint", image=Image.new("RGB", (64, 64)), mask=Image.new("L", (64, 64), 255))
    with pytest.raises(ValueError, match="no hosted endpoint"):
        load("dev", backend="api")


ERRORS = [
    ("broke-key", "p", "out of credits"),
    ("wrong-key-123", "p", "refused the key"),
    (GOOD_KEY, "bad [422]", "field 'safety_tolerance': must be <= 5"),
    (GOOD_KEY, "x [moderated-input]", "not charged"),
    (GOOD_KEY, "x [moderated-output]", "Content Moderated"),
    (GOOD_KEY, "x [error]", "failed on the BFL side"),
    (GOOD_KEY, "x [expired]", "result URL has expired"),
    (GOOD_KEY, "x [slow]", "not ready after"),
]


@pytest.mark.parametrize(("key", "prompt", "message"), ERRORS)
def test_failures_are_explained_and_never_show_the_key(bfl, key, prompt, message):
    with pytest.raises(HostedError, match=message) as e:
        pipe(bfl, key=key, max_wait=0.05)(prompt)
    assert key not in str(e.value)
    if "moderated" in prompt:
        assert e.value.charged is False


def test_429_is_retried_then_succeeds_and_is_bounded(bfl):
    waits = []
    c = BflClient(GOOD_KEY, bfl.url, sleep=waits.append, poll_interval=0.001)
    HostedPipeline("pro", c)("queue [busy2]")
    assert len(submitted(bfl, "queue [busy2]")) == 3 and waits[0] >= 1.0  # Retry-After honoured
    with pytest.raises(HostedError, match="too many active tasks"):
        pipe(bfl, retries=1)("again [busy2]")


def test_unknown_task_and_missing_key(bfl, tmp_path, monkeypatch):
    c = client(bfl)
    with pytest.raises(HostedError, match="not found"):
        c.poll({"id": "nope", "polling_url": f"{bfl.url}/v1/get_result?id=nope"})
    monkeypatch.delenv("BFL_API_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    with pytest.raises(HostedError, match="BFL_API_KEY"):
        BflClient()
    key_file = hosted.key_file()
    key_file.parent.mkdir(parents=True)
    key_file.write_text("file-key\n")
    key_file.chmod(0o644)
    with pytest.raises(HostedError, match="chmod 600"):
        BflClient()
    key_file.chmod(0o600)
    assert hosted.find_key() == "file-key"
    with pytest.raises(ValueError, match="plain http"):
        BflClient("k", "http://example.com")
    assert BflClient("k", "eu").base == "https://api.eu.bfl.ai" and "k" not in repr(BflClient("k"))


@pytest.fixture
def flux2(cli, monkeypatch):
    """The CLI in this process with these environment variables set (read when a command runs)."""

    def run(*args, env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return cli(*args)

    return run


def test_cli_generate_and_compare_local_beside_hosted(bfl, tmp_path, flux2):
    env = {"BFL_API_KEY": GOOD_KEY, "BFL_API_URL": bfl.url}
    run = flux2("generate", "a hosted cat", "--model", "max", "--size", "256x160", "--seed", "3", "-o",
                tmp_path / "max.png", "-q", env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    meta = json.loads(Image.open(tmp_path / "max.png").info["flux2"])
    assert (meta["model"], meta["seed"], meta["width"], meta["height"]) == ("max", 3, 256, 160)
    run = flux2("compare", "a red circle", "--models", "nano,pro", "--seeds", "1,2", "--size", "128x128",
                "-o", tmp_path / "cmp", "-q", env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [
        "grid.png", "nano-1.png", "nano-2.png", "pro-1.png", "pro-2.png"]  # fmt: skip
    run = flux2(
        "generate",
        "p",
        "--model",
        "pro",
        "-o",
        tmp_path / "x.png",
        env={"BFL_API_KEY": "broke-key", "BFL_API_URL": bfl.url},
    )
    assert run.returncode == 2 and "out of credits" in run.stderr and "broke-key" not in run.stderr
    run = flux2("models", env=env)
    assert any(line.startswith("pro ") and "key set" in line for line in run.stdout.splitlines())


def test_server_queues_hosted_jobs_and_lists_prices(bfl, tmp_path, monkeypatch):
    from flux2studio.serve.app import create_app

    monkeypatch.setenv("BFL_API_KEY", GOOD_KEY)
    monkeypatch.setenv("BFL_API_URL", bfl.url)

    def loader(model_id):
        p = load(model_id, backend="api" if model_id == "klein-9b" else "local", device="cpu")
        if isinstance(p, HostedPipeline):
            p.client.sleep, p.client.poll_interval = (lambda s: None), 0.001
        return p

    app = create_app(tmp_path / "data", loader, models=["nano", "pro", "klein-9b"], api_models=["klein-9b"])
    with TestClient(app, base_url=LOCAL) as c:
        rows = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert rows["pro"]["hosted"] and rows["pro"]["usd_per_image"] == 0.03 and rows["pro"]["steps"] is None
        assert rows["klein-9b"]["hosted"] and not rows["nano"]["hosted"]
        # the upsampling default where a model has one (nano's planner), none for pro or klein through the API
        assert [rows[m]["prompt_upsampling"] for m in ("nano", "pro", "klein-9b")] == [True, None, None]
        assert c.post("/v1/jobs", json={"model": "pro", "prompt": "p", "steps": 4}).status_code == 422
        r = c.post("/v1/jobs", json={"model": "pro", "prompt": "served", "width": 192, "height": 128, "seed": 5})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 60
        while (job := c.get(f"/v1/jobs/{r.json()['id']}").json())["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert job["status"] == "done", job
        image = Image.open(io.BytesIO(c.get(job["images"][0]).content))
        assert image.size == (192, 128) and json.loads(image.info["flux2"])["hosted"]["task_id"]
        r = c.post("/v1/images/generations", json={"model": "klein-9b", "prompt": "openai route", "size": "128x128"})
        assert r.status_code == 200, r.text
        # moderated: 400 content_policy_violation, as OpenAI answers, and not to be retried (before: 500, retried)
        r = c.post("/v1/images/generations", json={"model": "pro", "prompt": "x [moderated-output]"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy_violation", r.text
        assert r.headers["x-should-retry"] == "false" and "Content Moderated" in r.json()["error"]["message"]
    store = b"".join(p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert GOOD_KEY.encode() not in store
    with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as db:
        assert db.execute("select count(*) from jobs where status = 'done'").fetchone()[0] == 2


def test_a_failed_image_does_not_lose_the_others(bfl, tmp_path, flux2):
    """Tasks already submitted run to the end; what was made comes with the error (paid for, kept)."""
    with pytest.raises(HostedError, match=r"2 of 3 images made; .*failed on the BFL side") as e:
        pipe(bfl)(["first fine", "second [error]", "third fine"], size=(128, 128), seed=10)
    assert [i for i, _ in e.value.images] == [0, 2]
    assert json.loads(e.value.images[1][1].info["flux2"])["seed"] == 12
    env = {"BFL_API_KEY": GOOD_KEY, "BFL_API_URL": bfl.url}
    run = flux2("generate", "half [error-odd-seed]", "--model", "pro", "--num", "2", "--seed", "4", "--size",
                "128x128", "-o", tmp_path / "m.png", "-q", env=env)  # fmt: skip
    assert run.returncode == 2 and "1 of 2 images made" in run.stderr, run.stderr
    assert (tmp_path / "m-0.png").is_file() and not (tmp_path / "m-1.png").exists()  # the one made is saved
