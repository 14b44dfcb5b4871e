"""The job store suite, run against SQLite and against a real PostgreSQL server (started by the test on
127.0.0.1): lifecycle, atomic claims under concurrency (threads and processes), heartbeats and reaping,
bounded retries, migrations."""

import json
import multiprocessing
import time
import uuid

import pytest

from flux2studio.serve.store import MAX_ATTEMPTS, MIGRATIONS, Store
from flux2studio.settings import GenerationSettings


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    """A fresh store location: (data folder, db URL or None for SQLite)."""
    if request.param == "sqlite":
        return tmp_path / "data", None
    server = request.getfixturevalue("postgres")
    return tmp_path / "data", server.database(f"t{uuid.uuid4().hex[:12]}")


def settings(seed=0, width=64):
    return GenerationSettings("p", size=(width, 64), steps=2, guidance=1.0, seed=seed)


def test_lifecycle(db):
    data, url = db
    store = Store(data, db=url)
    assert store.version == MIGRATIONS[-1][0]
    a = store.add("nano", settings(0), 4)
    b = store.add("nano", settings(1), 4)
    assert store.count("queued") == 2 and store.get(a.id).settings.seed == 0
    job = store.claim(runner="r1")
    assert job.id == a.id and job.status == "running" and job.runner == "r1" and job.attempts == 1
    store.progress(a.id, 2, 4)
    assert store.get(a.id).step == 2
    done = store.finish(a.id, [b"\x89PNG fake"])
    assert done.status == "done" and store.image_path(done.images[0]).read_bytes() == b"\x89PNG fake"
    assert store.cancel(b.id) and store.get(b.id).status == "cancelled" and not store.cancel(b.id)
    assert [j.id for j in store.list()] == [b.id, a.id]
    assert store.image_path("../../etc/passwd") is None
    store.close()
    reopened = Store(data, db=url)  # migrations are applied once
    assert reopened.version == MIGRATIONS[-1][0] and reopened.get(a.id).status == "done"


def test_a_job_put_back_for_no_fault_of_its_own_keeps_its_tries(db):
    """A server stopping, a batch-mate cancelled: the try is refunded (both SQL dialects); only its runner's."""
    data, url = db
    store = Store(data, db=url)
    job = store.add("nano", settings(0), 4)
    for _ in range(MAX_ATTEMPTS + 1):
        assert store.claim(runner="r1").attempts == 1
        store.requeue(job.id, refund=True, runner="r1")
    assert store.get(job.id).status == "queued" and store.get(job.id).attempts == 0
    store.claim(runner="r2")
    store.requeue(job.id, refund=True, runner="r1")  # another runner has it now: left alone
    assert store.get(job.id).status == "running" and store.get(job.id).runner == "r2"


def test_compatible_claims_batch_only_matching_jobs(db):
    data, url = db
    store = Store(data, db=url)
    first = store.add("nano", settings(0), 4)
    store.add("nano", settings(1, width=128), 4)
    third = store.add("nano", settings(2), 4)
    job = store.claim()
    more = store.claim(like=job)
    assert (job.id, more.id) == (first.id, third.id)
    assert store.claim(like=job) is None


def test_dead_runners_jobs_are_taken_back_then_failed(db):
    data, url = db
    store = Store(data, db=url)
    job = store.add("nano", settings(), 4)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        claimed = store.claim(runner=f"r{attempt}")
        assert claimed.id == job.id and claimed.attempts == attempt
        store.beat([job.id])
        assert store.reap(lease=60) == 0  # alive
        time.sleep(0.05)
        taken = store.reap(lease=0.01)  # its runner stopped beating
        assert taken == (1 if attempt < MAX_ATTEMPTS else 0)
    final = store.get(job.id)
    assert final.status == "failed" and "died too often" in final.error


def test_recover_on_start(db):
    """SQLite belongs to one server: every running job at start is orphaned. A shared PostgreSQL store
    only takes back jobs whose runner stopped beating (another server may be running the others)."""
    data, url = db
    store = Store(data, db=url)
    store.add("nano", settings(), 4)
    store.claim(runner="elsewhere")
    again = Store(data, db=url)
    assert again.recover() == (0 if url else 1)


def _claimer(data, url, n_claims, out):
    store = Store(data, db=url)
    got = []
    while len(got) < n_claims:
        job = store.claim(runner=str(uuid.uuid4()))
        if job is None:
            break
        got.append(job.id)
    out.put(got)


def test_no_job_is_claimed_twice_by_concurrent_processes(db):
    data, url = db
    store = Store(data, db=url)
    ids = {store.add("nano", settings(i), 4).id for i in range(60)}
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(data, url, 60, out)) for _ in range(3)]
    for p in procs:
        p.start()
    claimed = [i for _ in procs for i in out.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    assert all(json.loads(json.dumps(store.get(i).attempts)) == 1 for i in ids)


def test_rows_of_every_settings_version_are_read(db):
    """Rows written before `GenerationSettings` (version 1: a flat dict, LoRAs inside) still load, batch with new
    ones and show clients the same fields; a row from a newer version, or with an unknown field, is a clear error."""
    data, url = db
    store = Store(data, db=url)
    old = {"prompt": "p", "negative_prompt": None, "width": 64, "height": 64, "steps": 2, "guidance": 1.0,
           "guidance_interval": None, "seed": 5, "num_images": 2, "refs": ["a" * 32], "prompt_upsampling": True,
           "loras": [["/srv/loras/style.safetensors", 0.5]]}  # fmt: skip
    store.db.execute(
        "INSERT INTO jobs (id, status, model, settings, created, steps) VALUES (?, 'queued', ?, ?, ?, ?)",
        ("1" * 32, "nano", json.dumps(old), 1.0, 2),
    )
    job = store.get("1" * 32)
    assert job.settings == GenerationSettings("p", size=(64, 64), steps=2, guidance=1.0, seed=5, num_images=2,
                                              refs=("a" * 32,), prompt_upsampling=True)  # fmt: skip
    assert job.loras == (("/srv/loras/style.safetensors", 0.5),)
    public = job.public()["settings"]
    assert {k: public[k] for k in old} == old | {"loras": [["style", 0.5]]}  # the same fields as before
    new = store.add("nano", job.settings.replace(prompt="q", seed=9), 2, loras=job.loras)
    assert new.batch_key == job.batch_key and store.get(new.id).settings.to_json()["version"] == 2
    assert store.add("nano", job.settings.replace(steps=3), 2, loras=job.loras).batch_key != job.batch_key
    assert store.add("nano", job.settings, 2).batch_key != job.batch_key  # without the LoRA
    for bad, message in (({**old, "version": 99}, "reads 1..2"), ({**old, "colour": 1}, r"unknown setting.s. colour")):
        with pytest.raises(ValueError, match=message):
            GenerationSettings.from_json({k: v for k, v in bad.items() if k != "loras"})


def test_settings_object():
    s = GenerationSettings.of(["a", "b"], num_images=3, seed=4)
    assert s.prompts == ("a", "b") and s.images == 6 and s.replace(seed=1).seed == 1 and s.seed == 4
    assert GenerationSettings.from_json(s.to_json()) == s.replace(prompt=("a", "b"))
    with pytest.raises(ValueError, match=r"unknown setting.s. stepz; known: aspect, expand"):
        GenerationSettings.of("p", stepz=4)
