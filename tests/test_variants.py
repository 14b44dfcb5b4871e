"""Variant registry: exact parameter counts, completeness, and `flux2 models --json` as a subprocess."""

import json
import subprocess
import sys

import pytest

from flux2studio.cli import transformer_params
from flux2studio.variants import VARIANTS, get_variant


@pytest.mark.parametrize(
    ("variant_id", "params"),
    [("klein-4b", 3_875_544_576), ("klein-9b", 9_078_581_248), ("dev", 32_223_281_152)],
)
def test_parameter_counts_are_exact(variant_id, params):
    assert transformer_params(variant_id) == params


def test_every_family_member_is_registered():
    local = {
        "dev",
        "klein-4b",
        "klein-9b",
        "klein-9b-kv",
        "klein-base-4b",
        "klein-base-9b",
        "nano",
        "nano-base",
    }
    hosted = {"pro", "max", "flex", "kontext-pro", "kontext-max"}
    assert local | hosted <= set(VARIANTS)
    for v in VARIANTS.values():
        assert v.description and v.license
        assert v.hosted == (v.id in hosted)
        if not v.hosted:
            assert v.transformer.context_dim == v.text_encoder.context_dim
            assert v.guidance_mode in {"embedded", "cfg", "none"}
    assert get_variant("dev").guidance_mode == "embedded"
    assert get_variant("klein-base-9b").guidance_mode == "cfg"
    assert get_variant("klein-4b").guidance_mode == "none"


def test_unknown_model_suggests_the_closest():
    with pytest.raises(ValueError, match="Did you mean 'klein-4b'"):
        get_variant("klien-4b")


def test_models_json_cli():
    out = subprocess.run(
        [sys.executable, "-m", "flux2studio.cli", "models", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {r["id"]: r for r in json.loads(out)}
    assert rows["klein-4b"]["params"] == 3_875_544_576
    assert rows["pro"]["hosted"] is True and rows["pro"]["params"] is None
    for r in rows.values():
        assert {"id", "params", "steps", "guidance", "guidance_mode", "license", "hosted"} <= set(r)
