"""Block streaming under a device budget: the plan (what stays resident, how many streamed blocks at once, the
errors) and its execution with the CPU standing in for the device, a Ledger counting the bytes copied in. On a
machine with a CUDA GPU the execution test runs on it too (side stream, pinned host memory)."""

import dataclasses

import pytest
import torch

from flux2studio.device_streaming import BlockStreamer, Ledger, available_ram, module_bytes, parse_bytes, plan_blocks
from flux2studio.model.transformer import Flux2Transformer
from flux2studio.sampling import image_ids, text_ids
from flux2studio.variants import TransformerConfig

TINY = TransformerConfig(in_channels=16, hidden_size=32, num_heads=2, depth=3, depth_single=4, context_dim=24,
                         axes_dim=(4, 4, 4, 4), guidance_embed=False)  # fmt: skip
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_parse_bytes():
    assert parse_bytes("8GB") == parse_bytes("8 GiB") == 8 * 2**30 and parse_bytes("512mb") == 2**29
    assert parse_bytes("1.5G") == 3 * 2**29 and parse_bytes(1000) == 1000
    assert parse_bytes("20GB", base=1000) == 20 * 10**9 and parse_bytes("1.5tb", base=1000) == 15 * 10**11  # disks
    for bad in ("eight", "8 parsecs", "0GB", "-1GB", "", "8 GBs"):
        with pytest.raises(ValueError, match="size"):
            parse_bytes(bad)


def test_plan_keeps_what_fits_and_streams_the_rest():
    sizes = [100] * 6
    everything = plan_blocks(sizes, fixed=50, budget=650)
    assert everything.resident == tuple(range(6)) and everything.streamed == () and everything.peak == 650
    tight = plan_blocks(sizes, fixed=50, budget=250)  # room for the fixed part and two slots, nothing resident
    assert tight.resident == () and tight.streamed == tuple(range(6)) and tight.peak == 250
    mixed = plan_blocks(sizes, fixed=50, budget=480)
    assert mixed.resident == (0, 1) and mixed.streamed == (2, 3, 4, 5) and mixed.peak == 450 <= 480
    deeper = plan_blocks(sizes, fixed=50, budget=480, prefetch=2)  # three slots: one block fewer resident
    assert deeper.resident == (0,) and deeper.peak == 450
    uneven = plan_blocks([300, 300, 100, 100, 100], fixed=0, budget=700)  # the window holds the other big one
    assert uneven.resident == (0,) and uneven.streamed == (1, 2, 3, 4) and uneven.peak == 700


def test_a_budget_below_two_blocks_says_what_would_fit():
    with pytest.raises(ValueError) as e:
        plan_blocks([2**30] * 4, fixed=2**29, budget=2 * 2**30, what="klein-9b's transformer")
    message = str(e.value)
    assert "2.00 GB is too small for klein-9b's transformer" in message and "at least 2.50 GB" in message
    assert "--vram 2.50 GB or more" in message and "--quantize int8" in message


@pytest.mark.parametrize("device", DEVICES)
def test_streamed_blocks_give_the_same_output_within_the_budget(device):
    torch.manual_seed(0)
    model = Flux2Transformer(TINY).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    img, txt, t = torch.randn(1, 6, 16), torch.randn(1, 5, 24), torch.tensor([0.7])
    args = (img, image_ids(2, 3), txt, text_ids(5), t)
    with torch.no_grad():
        expected = model(*args)
    blocks = [*model.double_blocks, *model.single_blocks]
    sizes = [module_bytes(b) for b in blocks]
    fixed = module_bytes(model) - sum(sizes)
    assert max(sizes[3:]) < min(sizes[:3])  # single-stream blocks are the smaller ones
    plan = plan_blocks(sizes, fixed, budget=fixed + 2 * max(sizes) + min(sizes))  # room for one single block
    assert plan.resident == (3,) and plan.streamed == (0, 1, 2, 4, 5, 6)
    for name, module in model.named_children():  # the parts outside the blocks live on the device
        if name not in ("double_blocks", "single_blocks"):
            module.to(device)
    ledger = Ledger()
    streamer = BlockStreamer(blocks, plan, device, ledger=ledger, pin=device == "cuda")
    seen = []  # at each streamed block's start: the copies started so far (its own and the prefetched next)
    for i in plan.streamed:
        blocks[i].register_forward_pre_hook(lambda _m, _a, i=i: seen.append((i, list(ledger.copies))))
    on_device = [a.to(device) for a in args]
    with torch.no_grad():
        first, second = model(*on_device), model(*on_device)  # the second pass reuses the prefetched block
    exact = {"rtol": 0, "atol": 0} if device == "cpu" else {"rtol": 1e-4, "atol": 1e-4}  # a GPU rounds otherwise
    torch.testing.assert_close(first.cpu(), expected, **exact)
    torch.testing.assert_close(second.cpu(), expected, **exact)
    streamed = list(plan.streamed)
    for k, (i, copies) in enumerate(seen[: len(streamed)]):  # pass 1: block i and the next were copied in
        assert i == streamed[k] and copies[-1] == streamed[(k + 1) % len(streamed)]
    assert ledger.peak == plan.peak - fixed - sizes[3]  # the two largest streamed blocks, never more
    assert ledger.now == sizes[streamed[0]] and ledger.copies.count(streamed[0]) == 3  # prefetched for pass 3
    assert all(p.device.type == "cpu" for i in plan.streamed for p in blocks[i].parameters())  # back on the host
    assert all(p.device.type == torch.device(device).type for p in blocks[3].parameters())
    streamer.remove()
    assert not streamer.pending and dataclasses.replace(plan, resident=()).peak < plan.peak


def _tiny_model() -> tuple[Flux2Transformer, list, tuple]:
    torch.manual_seed(0)
    model = Flux2Transformer(TINY).eval()
    args = (torch.randn(1, 6, 16), image_ids(2, 3), torch.randn(1, 5, 24), text_ids(5), torch.tensor([0.7]))
    return model, [*model.double_blocks, *model.single_blocks], args


def test_compiled_blocks_stream_without_recompiling():
    """The streamer's hooks stay out of compiled graphs: passes after the first compile nothing new (its ledger
    grows every pass; traced, it would be a guard failing on every call)."""
    import torch._dynamo

    model, blocks, args = _tiny_model()
    with torch.no_grad():
        expected = model(*args)
    sizes = [module_bytes(b) for b in blocks]
    plan = plan_blocks(
        sizes, module_bytes(model) - sum(sizes), budget=module_bytes(model) - sum(sizes) + 2 * max(sizes)
    )
    BlockStreamer(blocks, plan, "cpu")
    graphs = []

    def backend(gm, _inputs):  # counts what the compiler is given
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    for b in blocks:
        b.compile(backend=backend)
    with torch.no_grad():
        model(*args)
        compiled = len(graphs)
        for _ in range(3):
            torch.testing.assert_close(model(*args), expected, rtol=0, atol=0)
    torch._dynamo.reset()
    assert compiled > 0 and len(graphs) == compiled


def test_a_pipeline_under_a_budget_makes_the_same_image(monkeypatch):
    """The whole generation with a budget that streams every block (the CPU standing in for the device): the same
    image, no streamed block on the device after its phase, at most two of them during it."""
    from flux2studio import device_streaming
    from flux2studio.pipeline import build_request
    from flux2studio.residency import stream_weights
    from tiny import klein_pipeline

    monkeypatch.setattr(device_streaming, "WORK_HEADROOM", 0)  # a tiny model's work as traced
    plain = klein_pipeline()
    expected = plain("a red circle", size=(64, 64), steps=2, seed=3)[0]
    model = plain.transformer
    blocks = [*model.double_blocks, *model.single_blocks]
    sizes = [module_bytes(b) for b in blocks]
    work = plain.work_estimates(build_request(plain.variant, "x", size=(64, 64)))
    budget = module_bytes(model) - sum(sizes) + 2 * max(sizes) + work["transformer"]
    assert budget >= module_bytes(plain.vae) + work["VAE"]
    stream_weights(blocks)  # as a CPU load installs them: they must go when the weights move to the device
    piped = klein_pipeline(budget)
    piped.parts["transformer"] = type(piped.parts["transformer"]).of(model)
    peaks = []
    image = piped("a red circle", size=(64, 64), steps=2, seed=3,
                  callback=lambda i, n, x: peaks.append(model.block_streamer.ledger.peak))[0]  # fmt: skip
    assert image.tobytes() == expected.tobytes()
    assert peaks and max(peaks) <= 2 * max(sizes) and not hasattr(model, "block_streamer")  # released: back home
    assert not any(b._forward_hooks or b._forward_pre_hooks or hasattr(b, "page_hooks") for b in blocks)
    piped.vram_budget = 2 * max(sizes)
    with pytest.raises(ValueError, match="too small for klein-4b's transformer at 64x64"):
        piped("x", size=(64, 64))


def test_what_does_not_fit_is_refused_before_loading(monkeypatch):
    from flux2studio import loading
    from flux2studio.variants import get_variant

    klein9 = get_variant("klein-9b")
    monkeypatch.setattr(loading, "device_free_bytes", lambda device: 8 * 2**30)
    with pytest.raises(ValueError) as e:
        loading.check_fits(klein9, "cuda", torch.bfloat16, None, False, None)
    assert "klein-9b's transformer needs 16.9" in str(e.value) and "cuda has 8.00 GB free" in str(e.value)
    assert "--vram auto (stream blocks through 7.60 GB)" in str(e.value) and "--quantize int8" in str(e.value)
    loading.check_fits(klein9, "cuda", torch.bfloat16, "int4", False, None)  # 4-bit: about 5 GB, fits
    with pytest.raises(ValueError, match="budget of 512 MB is too small for klein-9b's transformer"):
        loading.check_fits(klein9, "cuda", torch.bfloat16, None, False, 2**29)
    with pytest.raises(
        ValueError, match=r"--vram 12\.00 GB is more than cuda has free \(8\.00 GB\): try --vram auto \(7\.60 GB\)"
    ):
        loading.check_fits(klein9, "cuda", torch.bfloat16, None, False, 12 * 2**30)
    loading.check_fits(klein9, "cuda", torch.bfloat16, None, False, 6 * 2**30)  # within free memory: streams
    monkeypatch.setattr(loading, "available_ram", lambda: 4 * 2**30)
    with pytest.raises(ValueError, match=r"this machine has 4\.00 GB available: try without resident"):
        loading.check_fits(klein9, "cpu", torch.bfloat16, None, True, None)
    loading.check_fits(klein9, "cpu", torch.bfloat16, None, False, None)  # streamed from the files: runs
    with pytest.raises(ValueError, match="--vram is a budget of accelerator memory"):
        loading.load("nano", device="cpu", vram_budget="8GB")


def _files(root, files: dict) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize("version", [1, 2])
def test_available_memory_is_what_the_containers_limit_leaves(tmp_path, version):
    """In a container the machine's MemAvailable is not what the process may take: the memory cgroup's limit less
    its usage is (its own, or a parent's if smaller; inactive file cache counted as free), v1 and v2 layouts."""
    gib, proc, groups = 2**30, tmp_path / "proc", tmp_path / "cgroup"
    _files(proc, {"meminfo": f"MemTotal: {64 * 2**20} kB\nMemAvailable: {48 * 2**20} kB\n"})
    if version == 1:
        _files(proc, {"self/cgroup": "5:cpu:/\n4:memory:/pod/box\n0::/\n"})
        pod, box, cache, unlimited = (
            groups / "memory/pod",
            groups / "memory/pod/box",
            "total_inactive_file",
            2**63 - 4096,
        )
        limit, usage = "memory.limit_in_bytes", "memory.usage_in_bytes"
    else:
        _files(proc, {"self/cgroup": "0::/pod/box\n"})
        pod, box, cache, unlimited = groups / "pod", groups / "pod/box", "inactive_file", "max"
        limit, usage = "memory.max", "memory.current"
    _files(box, {limit: f"{16 * gib}\n", usage: f"{6 * gib}\n", "memory.stat": f"anon 1\n{cache} {2 * gib}\n"})
    _files(pod, {limit: f"{unlimited}\n", usage: f"{9 * gib}\n", "memory.stat": f"{cache} 0\n"})
    assert available_ram(proc, groups) == 12 * gib  # 16 GB limit, 6 GB used of which 2 GB inactive cache
    _files(pod, {limit: f"{14 * gib}\n"})  # the pod's limit, with its other containers' use, leaves less
    assert available_ram(proc, groups) == 5 * gib
    _files(box, {limit: f"{unlimited}\n"})
    _files(pod, {limit: f"{unlimited}\n"})
    assert available_ram(proc, groups) == 48 * gib  # no limit: the machine's
    assert available_ram(tmp_path / "nowhere", groups) is None


def test_vram_auto_is_a_share_of_the_devices_free_memory(monkeypatch):
    """95% of what is free; for replicas packed on one GPU (a share below 1), of that share of the GPU's memory, or
    of what is free if less; a size as given; refused where the device cannot be asked."""
    from flux2studio import loading
    from flux2studio.serve.ray_app import ScaleConfig, replica_vram

    monkeypatch.setattr(loading, "device_free_bytes", lambda device: 8 * 2**30)
    monkeypatch.setattr(loading, "device_total_bytes", lambda device: 24 * 2**30)
    assert loading.vram_bytes("auto", "cuda") == int(8 * 2**30 * 0.95) == loading.vram_bytes(" AUTO ", "cuda:0")
    assert loading.vram_bytes("auto", "cuda", share=0.25) == int(6 * 2**30 * 0.95)  # a quarter of 24 GB
    assert loading.vram_bytes("auto", "cuda", share=0.5) == int(8 * 2**30 * 0.95)  # 12 GB, but 8 GB are free
    assert replica_vram(ScaleConfig(vram="auto", num_gpus=0.25)) == int(6 * 2**30 * 0.95)
    assert replica_vram(ScaleConfig(vram="auto", num_gpus=1)) == "auto"  # its own GPU: what is free as it loads
    assert replica_vram(ScaleConfig(vram="8GB", num_gpus=0.25)) == "8GB"
    assert loading.vram_bytes("6GB", "cuda") == 6 * 2**30 and loading.vram_bytes(None, "cuda") is None
    with pytest.raises(ValueError, match="--vram is a budget of accelerator memory"):
        loading.vram_bytes("auto", "cpu")
    monkeypatch.setattr(loading, "device_free_bytes", lambda device: None)
    with pytest.raises(ValueError, match=r"--vram auto: the free memory of mps cannot be asked; give a size"):
        loading.vram_bytes("auto", "mps")


def test_a_file_stored_smaller_is_sized_as_stored(monkeypatch, tmp_path):
    """A GGUF (or int8, fp8) transformer file stays its size in memory: the checks before loading scale the model
    to it instead of refusing what fits (klein-9b as bf16 is 16.9 GB; a 5 GB Q4_0 file fits 8 GB)."""
    from flux2studio import loading
    from flux2studio.variants import get_variant

    klein9 = get_variant("klein-9b")
    q4 = tmp_path / "klein-9b-Q4_0.gguf"
    with open(q4, "wb") as f:
        f.truncate(5 * 2**30)  # sparse: a size, no disk
    monkeypatch.setattr(loading, "device_free_bytes", lambda device: 8 * 2**30)
    with pytest.raises(ValueError, match=r"needs 16\.9"):
        loading.check_fits(klein9, "cuda", torch.bfloat16, None, False, None)
    loading.check_fits(klein9, "cuda", torch.bfloat16, None, False, None, [q4])
    with pytest.raises(ValueError, match=r"needs 5\.00 GB \(as stored in klein-9b-Q4_0\.gguf\); cuda has 4\.00 GB"):
        monkeypatch.setattr(loading, "device_free_bytes", lambda device: 4 * 2**30)
        loading.check_fits(klein9, "cuda", torch.bfloat16, None, False, None, [q4])
