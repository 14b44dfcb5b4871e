"""Schemathesis against the server's own OpenAPI document: generated inputs for every operation, and no
answer may be a server error. The worker runs the embedded nano, with limits small enough that every
accepted job finishes in well under a second; examples per operation are bounded."""

import tempfile

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from flux2studio.loading import load
from flux2studio.serve.app import create_app
from flux2studio.serve.limits import Limits

LIMITS = Limits(max_side=128, max_steps=4, max_images=2, max_queue=32, max_upload_bytes=2**20)
DATA = tempfile.TemporaryDirectory(prefix="flux2-fuzz-")  # removed after the module's tests
app = create_app(
    DATA.name,
    lambda m: load(m, device="cpu", resident=True),
    limits=LIMITS,
    models=["nano"],
    allowed_hosts=["testserver"],
)  # the Host its test client sends
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
# valid and invalid inputs; a fixed seed so a CI failure can be replayed
schema.config.generation.update(modes=list(schemathesis.GenerationMode), deterministic=True)


@pytest.fixture(scope="module", autouse=True)
def running_worker():
    with TestClient(app):  # runs the lifespan: the worker thread takes and finishes the accepted jobs
        yield
    DATA.cleanup()


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_a_server_error(case):
    response = case.call(timeout=60)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
