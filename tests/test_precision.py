"""The compute dtype per machine (`--dtype auto`) and bf16 weights computing in fp32, widened one block at a time.

The CPU's features are what torch reports; a machine without AVX512-BF16 is stood for by capping oneDNN with
ONEDNN_MAX_CPU_ISA=AVX2 (what a user of such a machine gets from the same code path) or by replacing
`precision.cpu_features`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from flux2studio import precision
from flux2studio.loading import load
from flux2studio.precision import compute_dtype


def _features(**on):
    names = ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx")
    return lambda: {n: on.get(n, False) for n in names}


@pytest.fixture
def avx2_only(monkeypatch):
    """A CPU like most laptops': AVX2, no AVX-512, no AMX."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setattr(precision, "cpu_features", _features(avx2=True))


def test_auto_picks_bf16_only_where_the_hardware_multiplies_it(monkeypatch, avx2_only):
    auto = compute_dtype("auto", "cpu")
    assert auto.dtype == torch.float32 and "no AVX512-BF16 or AMX" in auto.reason
    assert compute_dtype(None, "cpu") == auto  # the default
    monkeypatch.setattr(precision, "cpu_features", _features(avx2=True, avx512=True, avx512_bf16=True))
    assert compute_dtype("auto", "cpu").dtype == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_features", _features(avx2=True, avx512=True, amx=True))
    assert "AMX" in compute_dtype("auto", "cpu").reason
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # a user capping oneDNN: its bf16 kernels are off
    capped = compute_dtype("auto", "cpu")
    assert capped.dtype == torch.float32 and "ONEDNN_MAX_CPU_ISA=AVX2" in capped.reason
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert compute_dtype("auto", "cpu").dtype == torch.bfloat16
    assert compute_dtype("auto", "cuda").dtype == torch.bfloat16
    assert compute_dtype("auto", "mps").dtype == torch.float16


def test_an_explicit_dtype_wins_and_a_wrong_one_is_named(avx2_only):
    assert compute_dtype("bf16", "cpu") == precision.ComputeDtype(torch.bfloat16, "given")
    assert compute_dtype(torch.float16, "cpu").dtype == torch.float16
    with pytest.raises(ValueError, match=r"dtype 'int8' is not one of auto, bf16, fp16, fp32"):
        compute_dtype("int8", "cpu")


def _bf16_copy(folder: Path, dst: Path, as_fp32: bool = False) -> Path:
    """The folder with every float tensor rounded to bf16, stored as bf16 (or widened back to fp32: the same
    values, the old way of computing bf16 weights in fp32)."""
    shutil.copytree(folder, dst)
    for f in dst.rglob("*.safetensors"):
        with safe_open(f, "pt") as src:
            meta = src.metadata()
            sd = {k: src.get_tensor(k) for k in src.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
        if as_fp32:
            sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
        save_file(sd, f, metadata=meta)
    return dst


def test_bf16_weights_computing_in_fp32_are_widened_per_layer_and_give_the_fp32_image(klein_folder, tmp_path):
    """Stored bf16 (as the files are), computed in fp32: bit for bit the image of the same values stored as fp32;
    while a linear layer runs only its weight is fp32, after the call every block is bf16 again."""
    _, small = klein_folder
    narrow = load(weights=_bf16_copy(small, tmp_path / "bf16"), device="cpu", dtype="fp32")
    wide = load(weights=_bf16_copy(small, tmp_path / "fp32", as_fp32=True), device="cpu", dtype="fp32")

    model = narrow.transformer
    blocks = [*model.double_blocks, *model.single_blocks]
    linears = [m for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    wide_at_call = []  # per linear call: the block linears whose weight is fp32 at that moment

    def seen(linear, _args):
        wide_at_call.append((linear, [m for m in linears if m.weight.dtype == torch.float32]))

    for m in linears:
        m.register_forward_pre_hook(seen)  # after widen_on_use's own hook
    assert model.img_in.weight.dtype == torch.bfloat16  # outside the blocks too: widened as it runs
    a = narrow("a red circle", size=(64, 64), steps=2, seed=3)[0]
    b = wide("a red circle", size=(64, 64), steps=2, seed=3)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert len(wide_at_call) >= 2 * len(linears)  # every linear ran in both steps
    assert all(now == [linear] for linear, now in wide_at_call)  # its own weight, and only it
    assert all(p.dtype == torch.bfloat16 for b in blocks for p in b.parameters())
    assert all(m.weight.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, torch.nn.Linear))
    enc = narrow.parts["text_encoder"]
    assert not enc.loaded  # freed after its phase; loaded again it keeps bf16 layers too
    layers = enc.get().model.layers
    assert all(p.dtype == torch.bfloat16 for p in layers.parameters())


class BF16Compute(TorchDispatchMode):
    """Records every op that computes on bf16 tensors (a conversion, copy or view of one is not a computation)."""

    MOVES = frozenset({"_to_copy", "copy_", "clone", "detach", "view", "_unsafe_view", "alias", "t", "transpose",
                       "slice", "select", "index_select", "embedding", "cat", "stack", "expand", "unsqueeze",
                       "reshape", "contiguous", "permute", "empty_like", "lift_fresh", "split", "split_with_sizes",
                       "unbind", "squeeze", "as_strided"})  # fmt: skip

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        flat = [*args, *kwargs.values()]
        flat += [t for a in flat if isinstance(a, list | tuple) for t in a]
        if name not in self.MOVES and any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in flat):
            self.ops.add(name)
        return func(*args, **kwargs)


def test_auto_on_a_cpu_without_bf16_computes_nothing_in_bf16(klein_folder, tmp_path, monkeypatch):
    """bf16 weights, auto dtype, oneDNN capped at AVX2: no matmul, attention, norm or convolution sees a bf16
    tensor (on such CPUs a bf16 bmm outside nn.Linear falls to a reference loop); the image records why."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    _, small = klein_folder
    pipe = load(weights=_bf16_copy(small, tmp_path / "bf16"), device="cpu")
    assert pipe.dtype == torch.float32
    with BF16Compute() as mode:
        image = pipe("a red circle", size=(64, 64), steps=2)[0]
    assert mode.ops == set()
    meta = json.loads(image.info["flux2"])
    assert meta["dtype"] == "float32" and meta["dtype_reason"].startswith("auto: ONEDNN_MAX_CPU_ISA=AVX2")
    nano = load("nano")
    assert nano.dtype == torch.float32 and nano.dtype_reason.startswith("auto:")


def test_the_cli_says_what_computes_here(tmp_path, klein_folder, cli, monkeypatch):
    def stdout(*args):
        run = cli(*args)
        assert run.returncode == 0, run.stderr
        return run.stdout

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # read when asked (`precision.cpu_capped`)
    out = stdout("models")
    assert "local models compute here in fp32 (auto: ONEDNN_MAX_CPU_ISA=AVX2" in out
    rows = json.loads(stdout("models", "--json"))
    assert {r["id"]: r["compute_dtype"] for r in rows}["nano"] == "fp32"
    assert {r["id"]: r["compute_dtype"] for r in rows}["pro"] is None
    _, folder = klein_folder
    info = stdout("info", str(folder))
    assert "computes here in: fp32 (auto: ONEDNN_MAX_CPU_ISA=AVX2" in info
    image = tmp_path / "x.png"
    stdout("generate", "a red circle", "--steps", "1", "--dtype", "fp32", "-o", str(image))
    from PIL import Image

    assert json.loads(Image.open(image).info["flux2"])["dtype_reason"] == "given"
    stdout("generate", "--from", str(image), "-o", str(tmp_path / "again.png"))  # (said "given" too)
    assert json.loads(Image.open(tmp_path / "again.png").info["flux2"])["dtype_reason"] == "as recorded in x.png"


def test_fp8_file_stays_fp8_in_memory_and_gives_the_image_of_its_dequantised_weights(klein_folder, tmp_path):
    """An official-style fp8 file: the blocks' weights stay float8 (1 byte each, memory-mapped) and are
    dequantised (w.float() * scale) per layer as they run: bit for bit the image of the same file dequantised
    up front. A LoRA fuses into such a weight (into the compute dtype: the same image as the dense file's) and
    is removed exactly."""
    from flux2studio.checkpoints import dequantize_fp8, read_safetensors, strip_prefix
    from test_loading import _single_files

    path, te, folder = _single_files(klein_folder, tmp_path, fp8=True)
    shutil.copytree(folder / "tokenizer", tmp_path / "te" / "tokenizer")
    for f in te.iterdir():
        shutil.copy(f, tmp_path / "te" / f.name)
    fp8 = load("klein-4b", weights=path, text_encoder=tmp_path / "te", device="cpu", dtype="fp32")
    model = fp8.transformer
    qkv = model.double_blocks[0].img_attn.qkv.weight
    assert qkv.dtype == torch.float8_e4m3fn and qkv.fp8_scale.numel() == 1
    assert model.img_in.weight.dtype == torch.float32  # outside the blocks: dequantised once (not fp8-kept)

    dense_sd, _ = dequantize_fp8(strip_prefix(read_safetensors(path)), torch.float32)
    (tmp_path / "dense").mkdir()
    save_file({f"model.diffusion_model.{k}": v for k, v in dense_sd.items()}, tmp_path / "dense" / path.name)
    shutil.copy(path.parent / "ae.safetensors", tmp_path / "dense" / "ae.safetensors")
    dense = load("klein-4b", weights=tmp_path / "dense" / path.name, text_encoder=tmp_path / "te", dtype="fp32")
    plain = fp8("a red circle", size=(64, 64), steps=2, seed=3)[0]
    b = dense("a red circle", size=(64, 64), steps=2, seed=3)[0]
    assert np.array_equal(np.asarray(plain), np.asarray(b))
    assert qkv.dtype == torch.float8_e4m3fn  # back to fp8 after the blocks ran

    g = torch.Generator().manual_seed(0)
    rows, cols = qkv.shape
    name = "diffusion_model.double_blocks.0.img_attn.qkv"
    lora = {f"{name}.lora_A.weight": torch.randn(4, cols, generator=g), f"{name}.lora_B.weight": torch.randn(rows, 4)}
    save_file(lora, tmp_path / "lora.safetensors")
    before = qkv.data.clone()
    for pipe in (fp8, dense):
        pipe.set_loras([(tmp_path / "lora.safetensors", 0.5)])
    a = fp8("a red circle", size=(64, 64), steps=2, seed=3)[0]
    b = dense("a red circle", size=(64, 64), steps=2, seed=3)[0]
    assert not np.array_equal(np.asarray(a), np.asarray(plain))  # the LoRA is there
    assert np.array_equal(np.asarray(a), np.asarray(b))  # fused in fp32, as into the dense fp32 weights
    fp8.set_loras([])
    assert torch.equal(fp8.transformer.double_blocks[0].img_attn.qkv.weight.data.view(torch.uint8),
                       before.view(torch.uint8))  # fmt: skip


def test_a_layer_that_raises_gets_its_stored_weight_back():
    """Out of memory inside a layer must not leave its weight widened (a LoRA fused later would be undone)."""

    class Boom(torch.nn.Linear):
        def forward(self, x):
            raise MemoryError("no memory")

    model = torch.nn.Sequential(Boom(4, 4, bias=False)).bfloat16()
    precision.widen_on_use(model, [model], torch.float32)
    with pytest.raises(MemoryError):
        model(torch.zeros(1, 4))
    assert model[0].weight.dtype == torch.bfloat16


def test_importing_the_package_asks_mkl_for_reproducible_results_unless_the_user_chose():
    """MKL_CBWR (see flux2studio/__init__.py): without it two parity tests failed on an AMD EPYC."""
    code = "import os, flux2studio; print(os.environ['MKL_CBWR'])"
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "AUTO"
    env["MKL_CBWR"] = "COMPATIBLE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "COMPATIBLE"
