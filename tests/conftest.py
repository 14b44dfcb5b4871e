import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests share tiny.py

# bitsandbytes (a test dependency; diffusers imports it when it is installed) asks the Hugging Face Hub for a CPU
# kernel when first imported on AVX512-BF16 machines. Imported here first, with the Hub offline: nothing is fetched.
with pytest.MonkeyPatch.context() as _mp:
    import huggingface_hub.constants

    _mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    import bitsandbytes  # noqa: F401


@pytest.fixture
def cli(capsys):
    """`flux2 ARGS...` run in this process (`cli.main`: no interpreter start, torch already imported), as a
    CompletedProcess with its exit code and output. tests/test_cli.py runs the real `python -m` entry too."""
    from flux2studio.cli import main

    def run(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


@pytest.fixture(scope="session")
def klein_folder(tmp_path_factory):
    """A tiny klein pipeline saved by diffusers: text encoder deep enough for the real layers (9, 18, 27)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    from tiny import QWEN3_TEMPLATE, TRANSFORMER, VAE, diffusers_transformer, diffusers_vae, qwen3, tokenizer

    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", shift=3.0),
        vae=diffusers_vae(dataclasses.replace(VAE, channels=(32, 32, 32, 32))),
        text_encoder=qwen3(layers=28),
        tokenizer=tokenizer(QWEN3_TEMPLATE),
        transformer=diffusers_transformer(dataclasses.replace(TRANSFORMER, guidance_embed=False)),
        is_distilled=True,
    )
    folder = tmp_path_factory.mktemp("klein")
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on 127.0.0.1 for the session (Debian's package; `.ci/run` installs it)."""
    from pg import Postgres, pg_bin

    if pg_bin() is None:
        pytest.fail("PostgreSQL is not installed (apt-get install postgresql; .ci/run does this)")
    with Postgres() as server:
        yield server
