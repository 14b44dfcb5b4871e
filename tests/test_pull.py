"""`flux2 pull` against a local Hub mirror (loopback): download, resume, gated repos, `models` presence."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hub_mirror import HubMirror

REPO = "black-forest-labs/FLUX.2-klein-4B"


@pytest.fixture
def mirror(klein_folder, tmp_path):
    _, folder = klein_folder
    gated = "black-forest-labs/FLUX.2-klein-9B"
    hub = HubMirror({REPO: folder, gated: folder}, gated=(gated,))
    yield hub, folder, {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub"),
                        "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
    hub.close()


def flux2(*args, env):
    return subprocess.run([sys.executable, "-m", "flux2studio.cli", *args], capture_output=True, text=True, env=env)


def test_pull_downloads_a_loadable_folder_and_models_sees_it(mirror):
    _, folder, env = mirror
    run = flux2("pull", "klein-4b", env=env)
    assert run.returncode == 0, run.stderr
    local = Path(run.stdout.strip().split(": ", 1)[1])
    assert sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file()) == sorted(
        p.relative_to(folder) for p in folder.rglob("*") if p.is_file()
    )
    rows = {r["id"]: r for r in json.loads(flux2("models", "--json", env=env).stdout)}
    assert rows["klein-4b"]["present"] and not rows["klein-9b"]["present"]


def test_an_interrupted_pull_fetches_only_what_is_missing(mirror, tmp_path):
    """huggingface_hub 2 resumes per file: finished files stay, a file cut mid-way is fetched again."""
    hub, _, env = mirror
    assert flux2("pull", "klein-4b", env=env).returncode == 0
    blobs = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs"
    big = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    data = big.read_bytes()
    big.unlink()  # as if the download stopped during this file
    (blobs / (big.name + ".incomplete")).write_bytes(data[: len(data) // 2])
    hub.requests.clear()
    assert flux2("pull", "klein-4b", env=env).returncode == 0
    downloads = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    assert len(downloads) == 1 and downloads[0].endswith("diffusion_pytorch_model.safetensors"), hub.requests
    assert big.read_bytes() == data


def test_gated_repo_explains_what_to_do(mirror):
    _, _, env = mirror
    run = flux2("pull", "klein-9b", env=env)
    assert run.returncode == 2
    assert "is gated: accept its licence" in run.stderr and "HF_TOKEN" in run.stderr


def test_hosted_and_embedded_models_have_nothing_to_pull(mirror):
    _, _, env = mirror
    assert "hosted API" in flux2("pull", "pro", env=env).stderr
    assert "embedded" in flux2("pull", "nano", env=env).stderr


def test_pull_without_a_network_says_so(tmp_path):
    """No Hub to reach (offline, no DNS): one line that says so (it was "Got: ConnectError: ..." alone)."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5"}  # fmt: skip
    env.pop("HF_HUB_OFFLINE", None)
    run = flux2("pull", "klein-4b", env=env)
    assert run.returncode == 2 and f"cannot reach the Hugging Face Hub for {REPO}" in run.stderr, run.stderr
