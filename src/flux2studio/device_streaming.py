"""Block streaming to an accelerator under a memory budget: a model's blocks that do not fit stay in host memory
and are copied to the device just ahead of use, on a side stream, while the previous block computes (as diffusers'
group offload with streams does). `plan_blocks` decides what stays resident and how many streamed blocks are on
the device at once; `BlockStreamer` carries a plan out through forward hooks. Both run on any device: tests use the
CPU as a stand-in device whose bytes a `Ledger` counts, a GPU uses the same code with CUDA streams.

A budget covers a phase's weights and its work memory (activations): `PeakBytes` measures the latter by running
the computation on the meta device (shapes only, no arithmetic), and `work_reserve` adds room for what such a
trace cannot see (kernels' workspaces, the allocator's rounding).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
CGROUP_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def parse_bytes(text: str | int, base: int = 1024) -> int:
    """ "8GB", "7.5 GiB", "512MB" or a byte count -> bytes, K/M/G/T being powers of `base`: 1024 for memory
    (GB = GiB, as GPU tools report it), 1000 for disks (as they are sold)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE | re.ASCII)
        if not match:
            raise ValueError(f"size {text!r}: give a number with a unit, like 8GB or 512MB")
        value = int(float(match[1]) * base ** POWERS[match[2].lower()])
    if value <= 0:
        raise ValueError(f"size {text!r} must be more than 0 bytes")
    return value


def human(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def module_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    """The bytes of a module's parameters and buffers once cast to `dtype` (floating ones; packed stay as is)."""
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        size = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


class PeakBytes(TorchDispatchMode):
    """The most bytes that tensors made inside it held at once (a tensor's storage counted while it lives; views
    and in-place results add nothing), tensors made before it (weights, inputs) not counted. Run a model on the
    meta device under it to know its work memory at a shape without computing anything."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _gone(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            if id(storage) in inputs or storage in self._seen:
                continue
            n = storage.nbytes()
            self._seen[storage] = n
            weakref.finalize(storage, self._gone, n)
            self.live += n
        self.peak = max(self.peak, self.live)
        return out


def flash_attention_shapes(q: Tensor, k: Tensor, v: Tensor, *args, **kwargs) -> Tensor:
    """F.scaled_dot_product_attention's result shape with the memory of CUDA's fused kernels (output and
    log-sum-exp, no (L, L) matrix): a meta trace's stand-in for attention."""
    q.new_empty(q.shape[:-1], dtype=torch.float32)  # the log-sum-exp rows, freed at once
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def attention_shapes(q: Tensor, k: Tensor, v: Tensor, *args, **kwargs) -> Tensor:
    """The same where attention materialises its (B, H, L, L) scores and their softmax (Apple GPUs, PyTorch's
    math path)."""
    scores = q.new_empty((*q.shape[:-1], k.shape[-2]))
    weights = torch.empty_like(scores)
    del scores
    return weights.new_empty((*q.shape[:-1], v.shape[-1]))


def traced_work(run: Callable[[], object]) -> int:
    """Peak bytes of the tensors `run` makes (given meta tensors: shapes only, nothing computed)."""
    with torch.no_grad(), PeakBytes() as tracker:
        result = run()
        del result
    return tracker.peak


WORK_FACTOR, WORK_HEADROOM = 1.2, 128 * 2**20  # traced work memory x 1.2, plus 128 MB (not yet measured on a GPU)


def work_reserve(traced: int) -> int:
    """Device bytes kept for a phase's work whose tensors a trace counted as `traced`: the trace does not see
    kernels' own workspaces (cuBLAS, cuDNN), the caching allocator's rounding or fragmentation."""
    return int(traced * WORK_FACTOR) + WORK_HEADROOM


@dataclass(frozen=True)
class BlockPlan:
    """Which blocks stay on the device and how many streamed ones are there at once (the one running and the
    ones prefetched); `work` bytes of the budget are kept for the phase's activations."""

    budget: int
    fixed: int  # bytes always on the device: the weights outside the blocks
    block_bytes: tuple[int, ...]
    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    slots: int
    work: int = 0

    @property
    def peak(self) -> int:
        """The most bytes of weights on the device at any time."""
        window = sorted((self.block_bytes[i] for i in self.streamed), reverse=True)[: self.slots]
        return self.fixed + sum(self.block_bytes[i] for i in self.resident) + sum(window)


def least_held(fixed: int, block_bytes: Sequence[int], slots: int = 2) -> int:
    """The fewest weight bytes streaming holds at once: the part outside the blocks and the `slots` largest blocks
    (the one computing and the one arriving)."""
    return fixed + sum(sorted(block_bytes, reverse=True)[:slots])


def plan_blocks(block_bytes: Sequence[int], fixed: int, budget: int, *, prefetch: int = 1, what: str = "model",
                work: int = 0, smaller: str = "a smaller image") -> BlockPlan:  # fmt: skip
    """Keep blocks resident, in order, while the rest can still stream through `prefetch + 1` device slots within
    `budget` less `work` (the phase's activations: `work_reserve`). A budget below the least streaming needs is a
    ValueError saying what would fit (`smaller`: what needs less work)."""
    sizes = tuple(int(b) for b in block_bytes)
    slots = prefetch + 1
    room = budget - work
    if fixed + sum(sizes) <= room:
        return BlockPlan(budget, fixed, sizes, tuple(range(len(sizes))), (), slots, work)
    least = least_held(fixed, sizes, slots)
    if room < least:
        working = f" and about {human(work)} of work memory" if work else ""
        raise ValueError(
            f"a device budget of {human(budget)} is too small for {what}: streaming it needs at least "
            f"{human(least + work)} ({human(fixed)} always on the device, {slots} blocks of up to {human(max(sizes))}"
            f"{working}); give --vram {human(least + work)} or more, {smaller + ', ' if work else ''}or a "
            "smaller format (--quantize int8 halves bf16 weights, int4 quarters)"
        )
    resident: list[int] = []
    used = fixed
    for i, size in enumerate(sizes):
        rest = [sizes[j] for j in range(len(sizes)) if j != i and j not in resident]
        window = sum(sorted(rest, reverse=True)[:slots])
        if used + size + window <= room:
            resident.append(i)
            used += size
    streamed = tuple(i for i in range(len(sizes)) if i not in resident)
    return BlockPlan(budget, fixed, sizes, tuple(resident), streamed, slots, work)


def check_whole(weights: int, work: int, budget: int, what: str, smaller: str = "a smaller image") -> None:
    """Refuse a part that runs whole on the device (no blocks to stream) when its weights and work exceed `budget`."""
    if weights + work > budget:
        raise ValueError(
            f"a device budget of {human(budget)} is too small for {what}: it runs whole, {human(weights)} of "
            f"weights and about {human(work)} of work memory; give --vram {human(weights + work)} or more, or "
            f"{smaller}"
        )


@dataclass
class Ledger:
    """Bytes of streamed weights on the device now and at most (what a test checks against the plan)."""

    now: int = 0
    peak: int = 0
    copies: list[int] = field(default_factory=list)  # block indices, in the order their copies started

    def add(self, n: int) -> None:
        self.now += n
        self.peak = max(self.peak, self.now)


_side_streams: dict[torch.device, object] = {}  # one copy stream per device: its cached memory serves every phase


def _side_stream(device: torch.device):
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


class BlockStreamer:
    """Carries out a plan on `blocks`: resident blocks are moved to `device` once; each streamed block's weights
    stay on the host (pinned for CUDA with `pin`: otherwise a copy cannot run beside compute) and are copied in
    before it runs, the next streamed block's copy started as it starts (on a side CUDA stream: the copy overlaps
    its compute), and dropped from the device after it ran. At most `plan.slots` streamed blocks' weights exist on
    the device, in flight or not yet reusable: before a copy the host waits for the compute of the block whose
    memory it takes (CUDA's allocator would otherwise take fresh memory while the host runs ahead). Blocks run in
    list order, every pass (the next pass's first streamed block is prefetched by the last). The hooks are kept
    out of `torch.compile`'s graphs (compiled blocks: the blocks' own computation is compiled, not the copying)."""

    def __init__(self, blocks: Sequence[nn.Module], plan: BlockPlan, device: torch.device | str,
                 dtype: torch.dtype | None = None, ledger: Ledger | None = None,
                 pin: bool = False) -> None:  # fmt: skip
        self.blocks, self.plan = list(blocks), plan
        self.device, self.ledger = torch.device(device), ledger or Ledger()
        cuda = self.device.type == "cuda"
        self.stream = _side_stream(self.device) if cuda else None
        self.leaving: list = []  # CUDA events: recorded after a streamed block's compute, its memory reusable then
        # block -> (host tensors, device tensors, copy-done event); the host ones are read as the copy starts, so
        # weights changed in between (a LoRA fused, a new one set) are the ones copied and put back
        self.pending: dict[int, tuple[list[Tensor], list[Tensor], object]] = {}
        for i, block in enumerate(self.blocks):
            if i in plan.resident:
                block.to(self.device, dtype)
                continue
            block.to("cpu", dtype)
            for module in block.modules():  # buffers (small) live on the device; only parameters stream
                for name, b in module._buffers.items():
                    if b is not None:
                        module._buffers[name] = b.to(self.device)
            if cuda and pin:  # page-locked: the copies run asynchronously, at full bus speed
                for p in block.parameters():
                    p.data = p.data.pin_memory()
        self.order = list(plan.streamed)
        self.position = {i: k for k, i in enumerate(self.order)}  # looked up in every streamed block's hook
        self.handles = []
        for i in self.order:
            self.handles.append(self.blocks[i].register_forward_pre_hook(self._before(i)))
            self.handles.append(self.blocks[i].register_forward_hook(self._after(i)))

    def _copy(self, i: int) -> None:
        if i in self.pending:
            return
        host = [p.data for p in self.blocks[i].parameters()]
        if self.stream is None:  # a stand-in device: a plain copy
            self.ledger.copies.append(i)
            self.ledger.add(self.plan.block_bytes[i])
            self.pending[i] = (host, [h.to(self.device, copy=True) for h in host], None)
            return
        while self.leaving and len(self.pending) + len(self.leaving) >= self.plan.slots:
            self.leaving.pop(0).synchronize()  # that block's compute is done: its memory serves this copy
        self.ledger.copies.append(i)
        self.ledger.add(self.plan.block_bytes[i])
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the memory it reuses is free
        with torch.cuda.stream(self.stream):
            tensors = [h.to(self.device, non_blocking=True) for h in host]
            done = torch.cuda.Event()
            done.record(self.stream)
        self.pending[i] = (host, tensors, done)

    def _before(self, i: int):
        @torch.compiler.disable
        def hook(block: nn.Module, _args) -> None:
            self._copy(i)  # already under way, unless this is the first block of the first pass
            _, tensors, done = self.pending[i]
            if done is not None:
                torch.cuda.current_stream(self.device).wait_event(done)
                for t in tensors:
                    t.record_stream(torch.cuda.current_stream(self.device))  # freed only after this block's compute
            for p, t in zip(block.parameters(), tensors, strict=True):
                p.data = t
            k = self.position[i]
            for ahead in range(1, self.plan.slots):  # prefetch while this block computes
                self._copy(self.order[(k + ahead) % len(self.order)])

        return hook

    def _after(self, i: int):
        @torch.compiler.disable
        def hook(block: nn.Module, _args, _out) -> None:
            host, _, _ = self.pending.pop(i)
            for p, h in zip(block.parameters(), host, strict=True):
                p.data = h
            self.ledger.now -= self.plan.block_bytes[i]
            if self.stream is not None:
                left = torch.cuda.Event()
                left.record(torch.cuda.current_stream(self.device))  # after the block's kernels and its frees
                self.leaving.append(left)

        return hook

    def remove(self) -> None:
        """Stop streaming; the streamed blocks' weights stay on the host."""
        for h in self.handles:
            h.remove()
        self.pending.clear()
        self.leaving.clear()
        self.ledger.now = 0
        self.handles = []


def stream_to_device(model: nn.Module, blocks: Sequence[nn.Module], device: torch.device | str, budget: int,
                     what: str = "model", pin: bool = False, work: int = 0,
                     smaller: str = "a smaller image") -> BlockStreamer:  # fmt: skip
    """Put `model` on `device` within `budget` bytes, `work` of them kept for activations: what lies outside
    `blocks` moves there now, the blocks as `plan_blocks` decides (stored dtypes kept: packed and fp8 weights move
    as they are). The streamer is kept on the model (`model.block_streamer`); `to_host` undoes it all. Callers
    first remove hooks that hand back the blocks' file pages (`residency.stop_streaming_weights`): the weights
    leave those pages."""
    sizes = [module_bytes(b) for b in blocks]
    plan = plan_blocks(sizes, module_bytes(model) - sum(sizes), budget, what=what, work=work, smaller=smaller)
    inside = {id(t) for b in blocks for t in [*b.parameters(), *b.buffers()]}
    for module in model.modules():
        for t in [*module._parameters.values(), *module._buffers.values()]:
            if t is not None and id(t) not in inside:
                t.data = t.data.to(device)
    streamer = BlockStreamer(blocks, plan, device, pin=pin)
    model.block_streamer = streamer
    return streamer


def to_host(model: nn.Module) -> None:
    """Stop a model's streaming and bring every weight back to host memory (the end of its phase)."""
    streamer = getattr(model, "block_streamer", None)
    if streamer is not None:
        streamer.remove()
        del model.block_streamer
    model.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the phase's cached blocks back to the driver, for the next part


def device_free_bytes(device: torch.device | str) -> int | None:
    """Free memory of an accelerator (None where it cannot be asked): CUDA's, or what Metal recommends at most less
    what it holds (Apple GPUs share the machine's memory)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps" and torch.backends.mps.is_available():
        return max(0, torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return None


def device_total_bytes(device: torch.device | str) -> int | None:
    """An accelerator's whole memory (None where it cannot be asked): CUDA's, or what Metal recommends at most."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[1]
    if device.type == "mps" and torch.backends.mps.is_available():
        return torch.mps.recommended_max_memory()
    return None


def available_ram(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory this process may still take: Linux's MemAvailable (free plus reclaimable cache), or less where a
    memory cgroup it runs in (a container's limit, a Kubernetes pod's; v1 or v2, its own or one above) has less
    room left: the limit less the usage, inactive file cache counted as free (as `docker stats` counts it). None
    where neither can be read (not Linux)."""
    rooms = [room for room in (_mem_available(proc), *_cgroup_rooms(proc, cgroups)) if room is not None]
    return max(0, min(rooms)) if rooms else None


def _mem_available(proc: Path) -> int | None:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _cgroup_rooms(proc: Path, cgroups: Path) -> list[int]:
    """Limit less usage of every memory cgroup this process is in, from its own up, that has a limit."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    rooms: list[int] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if not controllers:  # v2, mounted alone or beside v1 ("unified")
            files = ("memory.max", "memory.current", "inactive_file")
            for base in (cgroups, cgroups / "unified"):
                rooms += _rooms_up(base, path, *files)
        elif "memory" in controllers.split(","):
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            rooms += _rooms_up(cgroups / "memory", path, *files)
    return rooms


def _rooms_up(base: Path, path: str, limit: str, usage: str, inactive: str) -> list[int]:
    group, rooms = base / path.strip("/"), []
    while group == base or base in group.parents:
        try:
            bound = (group / limit).read_text().strip()
            if bound != "max" and int(bound) < CGROUP_UNLIMITED:
                stat = dict(line.split(" ", 1) for line in (group / "memory.stat").read_text().splitlines())
                used = int((group / usage).read_text()) - int(stat.get(inactive, 0))
                rooms.append(int(bound) - used)
        except (OSError, ValueError):
            pass
        if group == base:
            break
        group = group.parent
    return rooms
