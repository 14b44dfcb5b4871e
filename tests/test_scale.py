"""Scale-out: two servers sharing one PostgreSQL store, and the Ray Serve deployment (a local Ray with
2 CPUs) serving the embedded model end to end, surviving a model replica killed mid-job.

Everything binds 127.0.0.1; waits are bounded."""

import base64
import io
import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from flux2studio.serve.store import Store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc=None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    raise TimeoutError(url)


def wait_done(store: Store, ids: list[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(store.get(i).status in ("done", "failed", "cancelled") for i in ids):
            return
        time.sleep(0.2)
    raise TimeoutError([store.get(i).status for i in ids])


def test_two_servers_on_one_postgres_never_double_run(postgres, tmp_path):
    url = postgres.database("two_servers")
    files = tmp_path / "shared"
    servers = []
    for name in ("a", "b"):
        port = free_port()
        cmd = [sys.executable, "-m", "flux2studio.cli", "serve", "--port", str(port), "--data", str(tmp_path / name),
               "--db", url, "--files", str(files), "--model", "nano"]  # fmt: skip
        servers.append((f"http://127.0.0.1:{port}", subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                                       stderr=subprocess.PIPE)))  # fmt: skip
    try:
        for base, proc in servers:
            wait_health(base, proc)
        ids = []
        for i in range(16):  # four sizes, so batches stay small and both servers get work
            base = servers[i % 2][0]
            size = 64 + 16 * (i % 4)
            r = httpx.post(f"{base}/v1/jobs", json={"model": "nano", "prompt": "a red circle", "seed": i,
                                                    "width": size, "height": size}, timeout=30)  # fmt: skip
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        store = Store(tmp_path / "check", db=url, files=files)
        wait_done(store, ids)
        jobs = [store.get(i) for i in ids]
        assert all(j.status == "done" and j.attempts == 1 and len(j.images) == 1 for j in jobs), jobs
        assert all(store.image_path(j.images[0]) for j in jobs)  # in the shared folder
        # the same job listed by either server: one store
        assert httpx.get(f"{servers[1][0]}/v1/jobs/{ids[0]}").json()["status"] == "done"
        pids = {j.runner.split(":")[1] for j in jobs}
        assert len(pids) == 2, pids  # both servers ran jobs, and no job ran twice (attempts == 1)
    finally:
        for _, proc in servers:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_cluster(postgres, tmp_path_factory):
    import ray
    from ray import serve

    from flux2studio.serve.ray_app import ScaleConfig, run

    url = postgres.database("ray")
    files = tmp_path_factory.mktemp("ray-files")
    cfg = ScaleConfig(models=["nano", "nano-base"], db=url, data=str(files), files=str(files), min_replicas=2,
                      max_replicas=2, num_cpus=0.5, threads=1, dispatch_loops=2)  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a local Ray with 2 CPUs
    port = free_port()
    run(cfg, "127.0.0.1", port, block=False)  # what `flux2 serve --ray` runs
    base = f"http://127.0.0.1:{port}"
    wait_health(base)
    yield base, Store(files, db=url, files=files)
    serve.shutdown()
    ray.shutdown()


def test_ray_serves_the_embedded_model_through_the_openai_route(ray_cluster):
    base, store = ray_cluster
    r = httpx.post(f"{base}/v1/images/generations", timeout=120,
                   json={"model": "nano", "prompt": "a blue square on a white background", "seed": 3})  # fmt: skip
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    meta = json.loads(image.info["flux2"])
    assert image.size == (128, 128) and meta["model"] == "nano" and meta["seed"] == 3
    job = store.list(limit=1)[0]
    assert job.runner.startswith("SERVE_REPLICA::flux2#Generator#")  # ran on a model replica


def test_killed_replica_mid_job_finishes_on_another(ray_cluster):
    import ray

    base, store = ray_cluster
    slow = {"model": "nano-base", "prompt": "a green triangle", "width": 256, "height": 256, "steps": 100, "seed": 1}
    r = httpx.post(f"{base}/v1/jobs", timeout=30, json=slow)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while (job := store.get(job_id)).step < 3:  # running on a replica, a few steps in
        assert time.monotonic() < deadline and job.status in ("queued", "running"), job
        time.sleep(0.05)
    victim = job.runner
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    wait_done(store, [job_id], timeout=240)
    final = store.get(job_id)
    assert final.status == "done" and len(final.images) == 1, final
    assert final.runner != victim and final.attempts == 2  # taken back, run again elsewhere, nothing lost


def test_scale_config_file(tmp_path):
    from flux2studio.serve.ray_app import ScaleConfig

    path = tmp_path / "scale.yaml"
    path.write_text("models: [nano]\nnum_gpus: 0.5\nmin_replicas: 1\nmax_replicas: 4\nvram: 8GB\n")
    cfg = ScaleConfig.read(path, db="postgresql://x@127.0.0.1/db")
    assert cfg.models == ["nano"] and cfg.num_gpus == 0.5 and cfg.db.startswith("postgresql://")
    assert cfg.vram == "8GB" and ScaleConfig.read(path, vram="12GB").vram == "12GB"  # --vram wins
    assert cfg.autoscaling() == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                 "target_ongoing_requests": 2.0}  # fmt: skip
    path.write_text("replicas: 3\n")
    with pytest.raises(ValueError, match=r"unknown settings.*replicas"):
        ScaleConfig.read(path)


def test_app_builder_for_serve_run_and_kuberay():
    from ray.serve import Application

    from flux2studio.serve.ray_app import app_builder

    assert isinstance(app_builder({"models": ["nano"], "max_replicas": 2}), Application)


def test_an_unreachable_store_or_missing_gpus_are_said_before_deploying(tmp_path, caplog):
    """Both made Ray's "deploy failed" (cause in its logs) or replicas pending for ever."""
    from flux2studio.serve.ray_app import ScaleConfig, check_gpus, run

    cfg = ScaleConfig(models=["nano"], db="postgresql://flux2:secret@127.0.0.1:1/flux2", data=str(tmp_path))
    with pytest.raises(
        ConnectionError, match=r"cannot reach the job store postgresql://flux2:\*\*\*@127\.0\.0\.1:1/fl"
    ) as e:
        run(cfg, "127.0.0.1", free_port(), block=False)
    assert "secret" not in str(e.value)
    gpu = ScaleConfig(num_gpus=1)
    with pytest.raises(ValueError, match=r"num_gpus 1 per replica, and this Ray cluster has no GPU: set num_gpus: 0"):
        check_gpus(gpu, 0, joined=False)
    check_gpus(gpu, 0, joined=True)  # an autoscaler may add GPU nodes to a cluster joined
    assert "has no GPU" in caplog.text
    check_gpus(gpu, 2, joined=False)
    check_gpus(ScaleConfig(num_gpus=0), 0, joined=False)
