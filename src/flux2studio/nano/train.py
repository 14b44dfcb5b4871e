"""Training of the embedded model on the Shapes world: the VAE, then `nano-base`, then `nano`.

Stages (each resumable from its last checkpoint, deterministic for a seed):
  vae      the FLUX.2 VAE class with small widths: L1 + MSE reconstruction, small KL; then the latent
           BatchNorm statistics are measured on fresh renders.
  base     rectified flow on VAE latents with 10% caption dropout (so real CFG works), EMA weights.
  distill  `nano`: a copy of nano-base trained to follow, in 4 Euler steps without CFG, the
           trajectories that nano-base draws with CFG in many steps (see `distill_step`).

Data is generated on the fly (a fresh scene for every sample), so there is no dataset to store.
Checkpoints are safetensors (model, EMA, optimizer moments) plus the step in the metadata.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import multiprocessing
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .. import sampling
from ..images import to_tensor
from ..model.autoencoder import AutoEncoder, patchify
from ..model.transformer import Flux2Transformer
from ..precision import autocast
from ..text_encoders import TextEncoder, load_minilm
from ..train.common import (
    Ema,
    checkpoint_meta,
    flow_loss,
    lr_at,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
    train_timesteps,
)
from ..variants import get_variant
from .checker import Analysis, as_detected, best_match, score
from .shapes import (
    CELLS,
    P_STATE,
    PLACE_TRIES,
    SHAPES,
    Constraints,
    Scene,
    caption,
    place,
    render,
    sample_scene,
    with_object_added,
)

# Training resolutions (width, height) and how often each is drawn: mostly the 128x128 default, some
# other aspect ratios so every supported preset has been seen.
BUCKETS: tuple[tuple[tuple[int, int], float], ...] = (
    ((128, 128), 0.6),
    ((64, 64), 0.08),
    ((96, 128), 0.08),
    ((128, 96), 0.08),
    ((160, 112), 0.08),
    ((192, 192), 0.08),
)


@dataclass(frozen=True)
class StageOptions:
    """The finer training knobs, set with `--set NAME=VALUE` (strings are converted to these types); a name not
    here is refused with the list of those that are. Which stage reads each is in its comment."""

    # base
    shift: float = 6.0  # time shift of the training noise levels (higher: more steps near pure noise)
    high_t: float = 0.0  # share of samples whose noise level is drawn from [0.9, 1] (`flow_timesteps`)
    mid_t: float = 0.0  # share drawn from [0.6, 0.95], where shapes are decided
    object_weight: float = 1.0  # loss weight of tokens covered by objects (1: all tokens alike)
    swap: float = 0.0  # share of counterfactual samples: x_t made from the scene with its stated shapes changed
    recount: float = 0.0  # share of counterfactuals with an object added or removed
    swap_lo: float = 0.6  # counterfactuals' noise levels: from here ...
    swap_hi: float = 0.95  # ... to here, where outlines and objects are decided
    siblings: int = 1  # samples sharing one caption, its scene placed again for each (divides the batch)
    objects: int | None = None  # at most this many objects a scene (None: the world's maximum)
    init_step: int = 0  # with `init` and no checkpoint: the step count continues from here
    # base and distill
    init: str | None = None  # start from these weights (a .safetensors of the stage's model)
    # distill
    guidance: float | None = None  # the teacher's CFG scale (None: nano-base's default)
    substeps: int = 6  # teacher steps per student step
    on_policy: float = 0.0  # chance a batch after the first segment starts from the student's own rollout
    # vae
    stats_images: int = 1024  # images to measure the latent statistics (BatchNorm) on
    # captions: how often each attribute is stated (None: the world's shapes.P_STATE / P_COARSE)
    p_color: float | None = None
    p_shape: float | None = None
    p_size: float | None = None
    p_cell: float | None = None
    p_background: float | None = None
    p_lighting: float | None = None
    p_coarse: float | None = None  # a whole caption states one kind of attribute only

    @classmethod
    def parse(cls, values: dict) -> StageOptions:
        """From `--set` pairs (strings or values); unknown names and unconvertible values are errors."""
        known = {f.name: f for f in fields(cls)}
        if unknown := sorted(set(values) - set(known)):
            raise ValueError(f"unknown option {', '.join(unknown)}: one of {', '.join(known)}")
        typed = {}
        for name, value in values.items():
            kind = {"float": float, "int": int, "str": str}[str(known[name].type).split(" ")[0]]
            try:
                typed[name] = None if value is None else kind(value)
            except ValueError:
                what = {float: "a number", int: "a whole number", str: "text"}[kind]
                raise ValueError(f"option {name}={value!r} is not {what}") from None
        return cls(**typed)


@dataclass(frozen=True)
class TrainConfig:
    stage: str  # "vae" | "base" | "distill"
    out: str = "runs/nano"
    steps: int = 1000
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    ckpt_every: int = 200
    eval_every: int = 0  # 0: no periodic eval
    caption_dropout: float = 0.1
    ema: float = 0.999
    kl_weight: float = 1e-4
    threads: int = 2
    extra: dict = field(default_factory=dict)  # `--set` pairs as given (kept in checkpoints): see `options`
    stop_after: int = 0  # 0: run to `steps`; else stop (with a checkpoint) after this step of the schedule
    device: str = "cpu"  # where the models run; data, noise and timesteps are drawn on the CPU either way
    workers: int = 0  # processes rendering the next batches while this one trains (0: render in-process)
    max_minutes: float = 0.0  # 0: no limit; else stop (with a checkpoint) after the step that passes it

    def __post_init__(self) -> None:
        for name in ("workers", "max_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: off), got {getattr(self, name)}")
        object.__setattr__(self, "options", StageOptions.parse(self.extra))  # typed; unknown names refused

    @property
    def end(self) -> int:
        """The step this run stops after: the learning-rate schedule still spans `steps`."""
        return min(self.steps, self.stop_after) if self.stop_after else self.steps

    def stops_early(self, step: int, t0: float) -> bool:
        """Whether `max_minutes` ends the run after `step` (0-based), `t0` being `time.monotonic()` when training
        began (loading is not counted); never on the last step, which ends the run anyway."""
        return bool(self.max_minutes) and step + 1 < self.end and time.monotonic() - t0 > 60 * self.max_minutes


# ----------------------------------------------------------------------------- checkpoints


def latest(out: Path, stage: str) -> Path | None:
    path = out / f"{stage}.ckpt.safetensors"
    return path if path.exists() else None


# ----------------------------------------------------------------------------- data


def pick_bucket(rng: np.random.Generator) -> tuple[int, int]:
    sizes, weights = zip(*BUCKETS, strict=True)
    return sizes[rng.choice(len(sizes), p=np.array(weights) / sum(weights))]


def image_batch(rng: np.random.Generator, n: int, size: tuple[int, int]) -> Tensor:
    """(n, 3, H, W) in [-1, 1]: fresh random scenes."""
    return torch.cat([to_tensor(render(sample_scene(rng), *size)) for _ in range(n)])


def vae_batch(rng: np.random.Generator, n: int, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Images and per-pixel loss weights: object pixels count OBJECT_WEIGHT times a background pixel.

    Objects cover a few percent of a canvas; unweighted, the VAE learns backgrounds long before it gets
    the exact palette colours right, and colour is what the checker (and a user) reads first.
    """
    images, weights = [], []
    for _ in range(n):
        scene = sample_scene(rng)
        x = to_tensor(render(scene, *size))
        images.append(x)
        weights.append(1 + (OBJECT_WEIGHT - 1) * object_pixels(scene, x))
    return torch.cat(images), torch.cat(weights)


def object_pixels(scene, image: Tensor) -> Tensor:
    """(1, 1, H, W) 1.0 where the render `image` of `scene` differs from its bare background, else 0.0."""
    bg = to_tensor(render(dataclasses.replace(scene, objects=()), image.shape[-1], image.shape[-2]))
    return ((image - bg).abs().amax(1, keepdim=True) > 0.02).float()


OBJECT_WEIGHT = 10.0
LATENT_NOISE = 0.1


@dataclass
class Batch:
    """Training images (n, 3, H, W), their captions, object masks per latent token (n, H/16 * W/16) if asked,
    and for counterfactuals (`Counterfactuals`): the images x_t is made from (the true image where there is
    none) and which samples have one (`swapped`); with siblings, each sample's group (`groups`, (n,) int64:
    samples of one group share their caption)."""

    images: Tensor
    captions: list[str]
    masks: Tensor | None = None
    starts: Tensor | None = None
    swapped: Tensor | None = None
    groups: Tensor | None = None


def caption_batch(
    rng: np.random.Generator,
    n: int,
    size: tuple[int, int],
    p_state: dict[str, float] | None = None,
    masks: bool = True,
    max_objects: int | None = None,
    swap: float = 0.0,
    recount: float = 0.0,
    siblings: int = 1,
) -> Batch:
    """Fresh scenes, captions and (if `masks`) object masks: a token is marked when any pixel of its 16x16
    cell differs from the bare background. `max_objects` draws 1..max_objects objects per scene (uniformly)
    instead of the world's 1..4, for a curriculum. `swap`: the share of samples whose captions state every
    object's shape that also get a counterfactual render with each shape changed (`swapped_shapes`);
    `recount`: the share of the others that get one with an object added or removed (`recounted`).
    `siblings` > 1: the samples come in groups of that many that share one caption, the scene placed again
    as the caption allows (`placed_again`) for each sample after the first (`flow_loss`'s `groups`).
    """
    if siblings < 1 or n % siblings:
        raise ValueError(f"siblings must be 1..{n} and divide the batch {n}, not {siblings}")
    images, captions, marked, starts, swapped, groups = [], [], [], [], [], []
    counterfactual = bool(swap or recount)
    for group in range(n // siblings):
        first = sample_scene(rng, None if max_objects is None else int(rng.integers(1, max_objects + 1)))
        text, constraints = caption(first, rng, p_state=p_state)
        for scene in [first, *(placed_again(first, constraints, rng) for _ in range(siblings - 1))]:
            x = to_tensor(render(scene, *size))
            if masks:
                marked.append(F.max_pool2d(object_pixels(scene, x), sampling.PIXELS_PER_TOKEN).flatten(1))
            images.append(x)
            captions.append(text)
            groups.append(group)
            if counterfactual:  # draws nothing from rng without them, so runs without keep their exact data
                other = swapped_shapes(scene, constraints, rng) if swap and rng.random() < swap else None
                if recount and other is None and rng.random() < recount:
                    other = recounted(scene, rng)
                starts.append(x if other is None else to_tensor(render(other, *size)))
                swapped.append(other is not None)
    return Batch(
        torch.cat(images),
        captions,
        torch.cat(marked) if masks else None,
        torch.cat(starts) if counterfactual else None,
        torch.tensor(swapped) if counterfactual else None,
        torch.tensor(groups) if siblings > 1 else None,
    )


def placed_again(scene: Scene, constraints: Constraints, rng: np.random.Generator) -> Scene:
    """Another draw of `scene`'s layout from what its caption allows: the same objects, each cell the caption
    states kept, the other objects in random free cells, every centre jittered anew, until the caption's
    relations hold as well (`scene` itself if PLACE_TRIES draws fail). A caption leaves the layout free
    as a rule, so these are scenes the caption describes just as well."""
    seen = Analysis(scene.background, scene.lighting, tuple(as_detected(o) for o in scene.objects))
    match = best_match(constraints, seen.objects)  # stated object -> scene object
    fixed = {match[k]: spec.cell for k, spec in enumerate(constraints.objects) if spec.cell is not None}
    for _ in range(PLACE_TRIES):
        free = [c for c in CELLS if c not in fixed.values()]
        cells = [fixed.get(i) or free.pop(int(rng.integers(len(free)))) for i in range(len(scene.objects))]
        placed = place(rng, [(o.shape, o.color, o.size, c) for o, c in zip(scene.objects, cells, strict=True)])
        if placed and score(constraints, dataclasses.replace(seen, objects=tuple(map(as_detected, placed)))).correct:
            return dataclasses.replace(scene, objects=placed)
    return scene


def swapped_shapes(scene: Scene, constraints: Constraints, rng: np.random.Generator) -> Scene | None:
    """`scene` with every object's shape changed to one of the other two, if the caption states every
    object's shape (else None: a shape the caption leaves free is not the caption's to correct)."""
    if not all(spec.shape for spec in constraints.objects):
        return None
    k = len(SHAPES)
    objects = [dataclasses.replace(o, shape=SHAPES[(SHAPES.index(o.shape) + int(rng.integers(1, k))) % k])
               for o in scene.objects]  # fmt: skip
    return dataclasses.replace(scene, objects=tuple(objects))


def recounted(scene: Scene, rng: np.random.Generator) -> Scene:
    """`scene` with one object more or one fewer (half the time each; fewer when it is full): a caption lists
    every object, so either is a scene for it to correct. The only object may go too: an empty canvas,
    which no caption allows."""
    if rng.random() < 0.5 or (more := with_object_added(scene, rng)) is None:
        drop = int(rng.integers(len(scene.objects)))
        return dataclasses.replace(scene, objects=scene.objects[:drop] + scene.objects[drop + 1 :])
    return more


@dataclass(frozen=True)
class Counterfactuals:
    """Shares of training samples whose x_t is made from a changed scene while the target stays the true
    one (`caption_batch`): `swap` with the stated shapes changed, `recount` with an object added or removed."""

    swap: float = 0.0
    recount: float = 0.0

    @classmethod
    def of(cls, cfg: TrainConfig) -> Counterfactuals:
        return cls(cfg.options.swap, cfg.options.recount)


# ----------------------------------------------------------------------------- stage: vae


def train_vae(cfg: TrainConfig, log: Callable[[dict], None]) -> AutoEncoder:
    vae_cfg = get_variant("nano").vae
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    vae = AutoEncoder(vae_cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    names = {p: n for n, p in vae.named_parameters()}
    out = Path(cfg.out)
    start = 0
    if ckpt := latest(out, "vae"):
        sd = load_file(str(ckpt))
        vae.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")})
        restore_optimizer(opt, names, sd)
        start = int(checkpoint_meta(ckpt)["step"])
    t0 = time.monotonic()
    for step in range(start, cfg.end):
        rng = np.random.default_rng([cfg.seed, step])
        x, weight = (t.to(device) for t in vae_batch(rng, cfg.batch, (128, 128)))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
        with autocast(device):
            mean = vae.moments(x).float()[:, : vae.cfg.z_channels]
            # Nearly deterministic: a fixed small noise instead of a learned variance. A learned variance
            # starts at 1 and drowns the signal; the diffusion model only ever sees posterior means anyway,
            # and the noise keeps the decoder tolerant of the small errors a sampler leaves.
            eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(cfg.seed * 7919 + step))
            y = vae.decode_raw(mean + LATENT_NOISE * eps.to(device)).float()
        err = y - x
        rec = ((err.abs() + err.pow(2)) * weight).mean() / weight.mean()
        kl = mean.pow(2).mean()  # keeps the latent scale bounded (the BatchNorm stats normalise it later)
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        log({"stage": "vae", "step": step + 1, "loss": loss.item(), "rec": rec.item(), "kl": kl.item()})
        stop = cfg.stops_early(step, t0)
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.end or stop:
            tensors = {f"model.{k}": v for k, v in vae.state_dict().items()}
            save_checkpoint(
                out / "vae.ckpt.safetensors", step + 1, tensors | optimizer_tensors(opt, names), asdict(cfg)
            )
        if stop:
            return vae  # stopped early: the latent statistics and vae.safetensors come with the finished run
    measure_latent_stats(vae, cfg.seed, n=cfg.options.stats_images)
    save_file({k: v.contiguous().cpu() for k, v in vae.state_dict().items()}, str(out / "vae.safetensors"))
    return vae


@torch.no_grad()
def measure_latent_stats(vae: AutoEncoder, seed: int, n: int = 1024, batch: int = 32) -> None:
    """Per-channel mean and variance of patchified posterior means -> the BatchNorm buffers."""
    vae.eval()
    device = next(vae.parameters()).device
    rng = np.random.default_rng([seed, 10**9])
    zs = []
    for _ in range(n // batch):
        x = image_batch(rng, batch, (128, 128)).to(device)
        with autocast(device):
            mean = vae.moments(x).float()[:, : vae.cfg.z_channels]
        zs.append(patchify(mean, vae.cfg.patch).transpose(0, 1).flatten(1))  # (128, B*h*w)
    z = torch.cat(zs, dim=1)
    vae.bn.running_mean.copy_(z.mean(dim=1))
    vae.bn.running_var.copy_(z.var(dim=1))


# ----------------------------------------------------------------------------- stage: base


class Frozen:
    """The frozen parts used to make training pairs: the VAE and the MiniLM text encoder."""

    def __init__(self, vae_path: Path, device: torch.device | str = "cpu") -> None:
        variant = get_variant("nano")
        self.device = torch.device(device)
        self.vae = AutoEncoder(variant.vae).eval()
        self.vae.load_state_dict(load_file(str(vae_path)))
        self.vae.to(self.device)
        self.text: TextEncoder = load_minilm(variant.text_encoder, self.device)
        self.empty = self.text([""]).float()  # (1, 64, 1152): dropout / negative prompt

    @torch.no_grad()
    def latents(self, images: Tensor) -> Tensor:
        with autocast(self.device):
            return self.vae.encode(images.to(self.device)).float()

    @torch.no_grad()
    def encode(self, images: Tensor, captions: list[str]) -> tuple[Tensor, Tensor]:
        with autocast(self.device):
            txt = self.text(captions).float()
        return self.latents(images), txt


def p_state(cfg: TrainConfig) -> dict[str, float]:
    """How often captions state each attribute, from `--set p_cell=1` etc. (shapes.P_STATE otherwise);
    `p_coarse` is how often a caption states one kind of attribute only (shapes.P_COARSE otherwise)."""
    given = {name: getattr(cfg.options, f"p_{name}") for name in (*P_STATE, "coarse")}
    return {name: value for name, value in given.items() if value is not None}


@dataclass
class Step:
    """One training batch as latents: `z` (B, 128, h, w), `txt` (B, L, C); with `Counterfactuals`, `start` holds
    the latents x_t is made from (the changed scene where `swapped`, else z). `swapped` stays on the CPU,
    where the noise levels it selects are drawn. `groups`: `flow_loss`'s, from `Batch.groups` with every
    dropped caption and every counterfactual in a group of its own."""

    step: int
    z: Tensor
    txt: Tensor
    masks: Tensor | None = None
    start: Tensor | None = None
    swapped: Tensor | None = None
    groups: Tensor | None = None


def step_batch(cfg: TrainConfig, step: int, masks: bool, cf: Counterfactuals) -> tuple[Batch, list[bool]]:
    """The scenes of one training step and which captions are dropped, all drawn from that step's own
    generator: the same data whether it is made here or in a worker, in any order, and on a resume."""
    rng = np.random.default_rng([cfg.seed, step])
    size = pick_bucket(rng)
    o = cfg.options
    batch = caption_batch(rng, cfg.batch, size, p_state(cfg), masks, o.objects, cf.swap, cf.recount, o.siblings)
    return batch, [bool(rng.random() < cfg.caption_dropout) for _ in batch.captions]


def _pixels(x: Tensor | None) -> np.ndarray | None:
    """Renders in [-1, 1] back to their uint8 pixels: a quarter of the bytes to send from a worker."""
    return None if x is None else ((x + 1) * 127.5).round().to(torch.uint8).numpy()


def _from_pixels(x: np.ndarray | None) -> Tensor | None:
    """Exactly the floats `to_tensor` makes from the same uint8 pixels."""
    return None if x is None else torch.from_numpy(x).float() / 255.0 * 2 - 1


def _as_arrays(x: Tensor | None) -> np.ndarray | None:
    return None if x is None else x.numpy()


def _as_tensor(x: np.ndarray | None) -> Tensor | None:
    return None if x is None else torch.from_numpy(x)


def _packed_step(args: tuple[TrainConfig, int, bool, Counterfactuals]) -> tuple:
    """`step_batch` in a worker, returned as numpy arrays: they pickle by value (tensors would go through
    shared memory, which a container may have little of)."""
    batch, dropped = step_batch(*args)
    return (_pixels(batch.images), batch.captions, _as_arrays(batch.masks), _pixels(batch.starts),
            _as_arrays(batch.swapped), _as_arrays(batch.groups), dropped)  # fmt: skip


def _unpack_step(packed: tuple) -> tuple[Batch, list[bool]]:
    images, captions, masks, starts, swapped, groups, dropped = packed
    batch = Batch(_from_pixels(images), captions, _as_tensor(masks), _from_pixels(starts), _as_tensor(swapped),
                  _as_tensor(groups))  # fmt: skip
    return batch, dropped


def _worker_init() -> None:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle, once


def step_batches(cfg: TrainConfig, start: int, masks: bool, cf: Counterfactuals) -> Iterator[tuple[Batch, list[bool]]]:
    """`step_batch` for every step from `start`, rendered `cfg.workers` at a time ahead of training (a
    bounded window, so a slow trainer never piles up renders) or in this process when workers is 0."""
    steps = iter(range(start, cfg.end))
    if not cfg.workers:
        yield from (step_batch(cfg, step, masks, cf) for step in steps)
        return
    # spawn: clean processes, whatever threads or devices this one has started. A worker that dies (killed,
    # out of memory) makes .result() raise BrokenProcessPool instead of waiting forever.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(cfg.workers, mp_context=context, initializer=_worker_init)
    window: deque = deque()

    def submit_next() -> None:
        if (step := next(steps, None)) is not None:
            window.append(pool.submit(_packed_step, (cfg, step, masks, cf)))

    try:
        for _ in range(2 * cfg.workers):
            submit_next()
        while window:
            packed = window.popleft().result()
            submit_next()
            yield _unpack_step(packed)
    finally:  # also when training stops early: renders not yet started are dropped
        pool.shutdown(wait=True, cancel_futures=True)


def batches(
    cfg: TrainConfig, frozen: Frozen, start: int, masks: bool = False, cf: Counterfactuals = Counterfactuals()
) -> Iterator[Step]:
    device = frozen.device
    for step, (batch, dropped) in enumerate(step_batches(cfg, start, masks, cf), start):
        captions = ["" if d else c for c, d in zip(batch.captions, dropped, strict=True)]
        z, txt = frozen.encode(batch.images, captions)
        z_start = swapped = None
        if batch.swapped is not None:
            swapped = batch.swapped & ~torch.tensor(dropped)  # an empty caption has nothing to correct
            z_start = z.clone()
            if swapped.any():
                z_start[swapped.to(device)] = frozen.latents(batch.starts[swapped])
        masks_ = None if batch.masks is None else batch.masks.to(device)
        groups = None
        if batch.groups is not None:  # an empty caption or a counterfactual start: x_t is not from the group
            alone = torch.tensor(dropped) | (swapped if swapped is not None else False)
            n = len(batch.groups)
            groups = torch.where(alone, n + torch.arange(n), batch.groups).to(device)
        yield Step(step, z, txt, masks_, z_start, swapped, groups)


def flow_timesteps(g: torch.Generator, n: int, shift: float, high_t: float = 0.0, mid_t: float = 0.0) -> Tensor:
    """Noise levels for `base`: the shifted uniform of `train_timesteps`, with a fraction `high_t` of the
    samples drawn uniformly from [0.9, 1] and a fraction `mid_t` from [0.6, 0.95] instead.

    Why: at 64 tokens an object's latent shows through the noise up to t ~ 0.93 (its per-token signal is
    about 10x the background's), so below that the model finds the object in x_t and never needs the
    caption to place it. Only near pure noise does the text alone decide where things go; with the
    shifted uniform alone (~16% of samples above 0.93) nano-base learnt colours but ignored every
    position word (README, "Why nano ignored position words, and the fix").

    Why `mid_t`: shapes are decided between t ~ 0.95 and 0.6 (the x0 estimate of a sampling run takes its
    outline there and keeps it), after the object's place shows in x_t but before its outline does; in
    a one-object probe, 300 steps with `mid_t` doubled how much the shape word changes the loss there.
    """
    t = train_timesteps(g, n, shift)
    if high_t:
        high = torch.rand(n, generator=g) < high_t
        t = torch.where(high, 0.9 + 0.1 * torch.rand(n, generator=g), t)
    if mid_t:  # drawn after high_t's numbers, so runs without it keep their exact timesteps
        mid = torch.rand(n, generator=g) < mid_t
        t = torch.where(mid, 0.6 + 0.35 * torch.rand(n, generator=g), t)
    return t


def resume(ckpt: Path, model: nn.Module, ema: Ema, opt: torch.optim.Optimizer, names: dict) -> int:
    """Restore model, EMA and optimizer from a checkpoint if there is one; returns the step to start at."""
    if not ckpt.exists():
        return 0
    sd = load_file(str(ckpt))
    model.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")})
    device = next(model.parameters()).device
    ema.shadow = {k[4:]: v.to(device) for k, v in sd.items() if k.startswith("ema.")}
    restore_optimizer(opt, names, sd)
    return int(checkpoint_meta(ckpt)["step"])


def snapshot(out: Path, stage: str, name: str, step: int, model, ema: Ema, opt, names: dict, cfg: TrainConfig) -> None:
    """Checkpoint (model, EMA, optimizer) for resuming, and the EMA weights alone as `name`.safetensors."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.shadow.items()} | optimizer_tensors(opt, names)
    save_checkpoint(out / f"{stage}.ckpt.safetensors", step, tensors, asdict(cfg))
    weights = {k: v.contiguous().cpu() for k, v in ema.shadow.items()}
    save_file(weights, str(out / f"{name}.safetensors"), metadata={"step": str(step)})


@dataclass
class Loop:
    """How a `base` or `distill` step ends: the update, the EMA, the log row, snapshots and evals when due, and
    the time limit. `name` is the EMA weights file the stage leaves (nano-base or nano)."""

    cfg: TrainConfig
    stage: str
    name: str
    model: nn.Module
    ema: Ema
    opt: torch.optim.Optimizer
    names: dict
    log: Callable[[dict], None]
    evaluate: Callable | None = None
    t0: float = field(default_factory=time.monotonic)  # training began (loading is not counted)

    def update(self, step: int, loss: Tensor, **row) -> bool:
        """Backpropagate `loss` and take the step; True when `max_minutes` ends the run here."""
        cfg, out = self.cfg, Path(self.cfg.out)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.ema.update(self.model, step)
        self.log({"stage": self.stage, "step": step + 1, "loss": loss.item(), "grad": grad.item(), **row,
                  "s": round(time.monotonic() - self.t0, 1)})  # fmt: skip
        stop = cfg.stops_early(step, self.t0)
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.end or stop:
            snapshot(out, self.stage, self.name, step + 1, self.model, self.ema, self.opt, self.names, cfg)
        if self.evaluate and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            self.log({"stage": self.stage, "step": step + 1, "eval": self.evaluate(out / f"{self.name}.safetensors")})
        return stop


def train_flow(cfg: TrainConfig, log: Callable[[dict], None], evaluate: Callable | None = None) -> None:
    """Stage `base`: nano-base from scratch (or from `--set init=WEIGHTS`), with caption dropout and EMA.

    `init` continues from shipped weights when the run folder (and its optimizer state) is gone: the
    optimizer restarts, the step count continues from `--set init_step=N`.
    """
    out = Path(cfg.out)
    device = torch.device(cfg.device)
    frozen = Frozen(out / "vae.safetensors", device)
    torch.manual_seed(cfg.seed)
    model = Flux2Transformer(get_variant("nano-base").transformer)
    if init := cfg.options.init:
        model.load_state_dict({k: v.float() for k, v in load_file(init).items()})
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    names = {p: n for n, p in model.named_parameters()}
    ema = Ema(model, cfg.ema)
    start = resume(out / "base.ckpt.safetensors", model, ema, opt, names) or cfg.options.init_step
    shift = cfg.options.shift
    # Objects cover a few tokens of 64; weighting them makes the loss (and the gradient) about what the
    # caption says rather than about the background, which is learnt early anyway.
    object_weight = cfg.options.object_weight
    high_t, mid_t = cfg.options.high_t, cfg.options.mid_t
    # Counterfactuals (stated shapes changed, an object added or removed): x_t made from the changed scene,
    # the target the true scene, at noise levels in [swap_lo, swap_hi] where outlines and objects are decided.
    swap_lo, swap_hi = cfg.options.swap_lo, cfg.options.swap_hi
    loop = Loop(cfg, "base", "nano-base", model, ema, opt, names, log, evaluate)
    stream = batches(cfg, frozen, start, masks=object_weight != 1, cf=Counterfactuals.of(cfg))
    with contextlib.closing(stream):  # closed on a break or an error: the render workers end with it
        for b in stream:
            step = b.step
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            t = flow_timesteps(g, b.z.shape[0], shift, high_t, mid_t)
            noise = torch.randn(b.z.shape, generator=g)
            if b.swapped is not None:  # drawn after the noise, so runs without counterfactuals keep their numbers
                t = torch.where(b.swapped, swap_lo + (swap_hi - swap_lo) * torch.rand(t.shape, generator=g), t)
            lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            weight = None if b.masks is None else 1 + (object_weight - 1) * b.masks
            with autocast(device):
                loss = flow_loss(
                    model, b.z, b.txt, t.to(device), noise.to(device), weight=weight, start=b.start, groups=b.groups
                )
            if loop.update(step, loss, lr=lr):
                break


# ----------------------------------------------------------------------------- stage: distill


def velocity_of(model: Flux2Transformer, ids: tuple[Tensor, Tensor], txt: Tensor) -> sampling.Velocity:
    """The model's velocity for these image and text position ids and this text, under bf16 autocast, in fp32."""
    img_ids, txt_ids = ids

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        with autocast(x.device):
            return model(x, img_ids, txt, txt_ids, t).float()

    return velocity


def teacher_segment(
    teacher: Flux2Transformer, x: Tensor, ids: tuple[Tensor, Tensor], txt: Tensor, empty: Tensor,
    a: float, b: float, substeps: int, guidance: float,
) -> Tensor:  # fmt: skip
    """Integrate the teacher's CFG velocity from noise level a to b in `substeps` Euler steps; `ids` are the
    image and text position ids."""
    velocity = sampling.cfg_velocity(
        velocity_of(teacher, ids, txt), velocity_of(teacher, ids, empty.expand_as(txt)), guidance
    )
    return sampling.denoise(velocity, x, torch.linspace(a, b, substeps + 1, device=x.device))


@torch.no_grad()
def student_rollout(
    model: Flux2Transformer, x: Tensor, ids: tuple[Tensor, Tensor], txt: Tensor, sigmas: Tensor
) -> Tensor:
    """Where the student's own Euler steps over `sigmas` take x, without gradients: the point it starts its
    next segment from when it samples."""
    return sampling.denoise(velocity_of(model, ids, txt), x, sigmas.to(x.device))


def train_distill(cfg: TrainConfig, log: Callable[[dict], None], evaluate: Callable | None = None) -> None:
    """Stage `distill`: `nano`, 4 Euler steps without CFG, from nano-base (the teacher, with CFG).

    Method: segment distillation. The student's 4-step schedule splits [1, 0] into 4 segments. Each
    training batch picks a segment [a, b], noises real latents to level a (x_a = (1 - a) z + a n, the
    rectified-flow marginal), lets the teacher integrate its CFG velocity from a to b in several small
    Euler steps, and teaches the student the single velocity (x_b - x_a) / (b - a) that lands where
    the teacher lands. Why: it bakes CFG and the step count in at once, needs no
    discriminator or extra network, and is stable on a small CPU budget; the student starts from the
    teacher's weights so early steps are already close, or from `--set init=WEIGHTS` (an earlier `nano`,
    already a 4-step model, when the teacher has only moved on a little).

    The segments are those of nano's own noise levels (`Variant.mu`). `--set on_policy=P` starts a batch
    after the first segment, with probability P, from where the student's own earlier steps land (a rollout
    from noise without gradients) instead of from noised real latents: that is the point the student meets
    when it samples, and with CFG the teacher's trajectories leave the noised-data marginal, so the two differ.
    """
    out = Path(cfg.out)
    device = torch.device(cfg.device)
    frozen = Frozen(out / "vae.safetensors", device)
    teacher = Flux2Transformer(get_variant("nano-base").transformer).eval()
    teacher.load_state_dict(load_file(str(out / "nano-base.safetensors")))
    teacher.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    model = copy.deepcopy(teacher).train()
    if init := cfg.options.init:
        model.load_state_dict({k: v.float() for k, v in load_file(init).items()})
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    names = {p: n for n, p in model.named_parameters()}
    ema = Ema(model, cfg.ema)
    start = resume(out / "distill.ckpt.safetensors", model, ema, opt, names)
    student = get_variant("nano")
    guidance = get_variant("nano-base").guidance if cfg.options.guidance is None else cfg.options.guidance
    substeps, on_policy = cfg.options.substeps, cfg.options.on_policy
    plain = TrainConfig(**{**asdict(cfg), "caption_dropout": 0.0})
    loop = Loop(cfg, "distill", "nano", model, ema, opt, names, log, evaluate)
    with contextlib.closing(batches(plain, frozen, start)) as stream:
        for b in stream:
            step, z, txt = b.step, b.z, b.txt
            g = torch.Generator().manual_seed(cfg.seed * 1_000_033 + step)
            h, w = z.shape[-2:]
            sigmas = sampling.schedule(student.steps, h * w, student.mu)
            segment = int(torch.randint(student.steps, (1,), generator=g))
            noise = torch.randn(z.shape, generator=g).to(device)
            rollout = segment > 0 and float(torch.rand((), generator=g)) < on_policy
            a, b = sigmas[segment], sigmas[segment + 1]
            img_ids, txt_ids = sampling.image_ids(h, w).to(device), sampling.text_ids(txt.shape[1]).to(device)
            if rollout:
                x_a = student_rollout(model, sampling.pack(noise), (img_ids, txt_ids), txt, sigmas[: segment + 1])
            else:
                x_a = (1 - a) * sampling.pack(z) + a * sampling.pack(noise)
            with torch.no_grad():
                x_b = teacher_segment(teacher, x_a, (img_ids, txt_ids), txt, frozen.empty, a.item(), b.item(),
                                      substeps, guidance)  # fmt: skip
            target = (x_b - x_a) / (b - a)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
            with autocast(device):
                v = model(x_a, img_ids, txt, txt_ids, a.to(device).expand(z.shape[0]))
            loss = F.mse_loss(v.float(), target)
            if loop.update(step, loss, segment=segment, rollout=rollout):
                break


# ----------------------------------------------------------------------------- entry


def run(cfg: TrainConfig, evaluate: Callable | None = None) -> None:
    """Run one stage, appending one JSON line per step to OUT/train.jsonl, with a progress bar."""
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{cfg.stage}.config.json").write_text(json.dumps(asdict(cfg), indent=2))
    bar = tqdm(total=cfg.steps, desc=f"nano {cfg.stage}", dynamic_ncols=True)
    with open(out / "train.jsonl", "a") as f:

        def log(row: dict) -> None:
            f.write(json.dumps(row) + "\n")
            f.flush()
            bar.n = row["step"]
            bar.set_postfix({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items() if k == "loss"})
            bar.refresh()

        if cfg.stage == "vae":
            train_vae(cfg, log)
        elif cfg.stage == "base":
            train_flow(cfg, log, evaluate)
        elif cfg.stage == "distill":
            train_distill(cfg, log, evaluate)
        else:
            raise ValueError(f"unknown stage {cfg.stage!r}: vae, base or distill")
    bar.close()


# The EMA weights file each flow stage leaves, with its step in the metadata (the VAE's file is copied into
# every continuation's folder, so only its checkpoint counts).
WEIGHTS = {"base": "nano-base", "distill": "nano"}


def steps_done(run: Path, stage: str) -> int | None:
    """The step of the weights a run's stage left (None: the stage did not run there): its checkpoint's, or,
    for a run trained on another machine and brought back without its optimizer state, the step its weights
    file records."""
    paths = [run / f"{stage}.ckpt.safetensors"] + ([run / f"{WEIGHTS[stage]}.safetensors"] if stage in WEIGHTS else [])
    for path in paths:
        if path.exists() and "step" in (meta := checkpoint_meta(path) or {}):
            return int(meta["step"])
    return None


def export(
    out: str | Path,
    dest: Path | None = None,
    evals: dict | None = None,
    chain: tuple[str | Path, ...] = (),
    distill_chain: tuple[str | Path, ...] = (),
    previous: dict | None = None,
) -> list[Path]:
    """Copy the trained weights into the package (bf16 transformers, fp32 VAE) with their provenance.

    `chain`: the earlier run folders the weights went through, oldest first (the VAE's, then every `base`
    continuation that `--set init=` started from the one before); the card lists each one's config and steps.
    `distill_chain`: likewise the earlier `distill` runs, when this one's student started from their `nano`.
    `previous`: the card (nano.json) of the weights this run started from, when their run folders are gone:
    its runs come first and its steps count.
    """
    from ..checkpoints import EMBEDDED, write_safetensors

    out, dest = Path(out), dest or EMBEDDED
    written = []
    for src, name, dtype in (("nano-base", "nano-base", torch.bfloat16), ("nano", "nano", torch.bfloat16),
                             ("vae", "nano-vae", torch.float32)):  # fmt: skip
        sd = load_file(str(out / f"{src}.safetensors"))
        target = dest / f"{name}.safetensors"
        target.unlink(missing_ok=True)
        write_safetensors({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, target)
        written.append(target)
    steps: dict[str, int] = dict(previous["trained_steps"]) if previous else {}
    stages = list(previous["runs"]) if previous else []
    earlier = [*((Path(d), ("vae", "base")) for d in chain), *((Path(d), ("distill",)) for d in distill_chain)]
    for run, kinds in [*earlier, (out, ("vae", "base", "distill"))]:
        for stage in kinds:
            if (n := steps_done(run, stage)) is None:
                continue
            config = json.loads((run / f"{stage}.config.json").read_text())
            stages.append({"stage": stage, "folder": run.name, "steps_run": n, "config": config})
            steps[stage] = steps.get(stage, 0) + n if stage != "vae" else n
    configs = {st["stage"]: st["config"] for st in stages}  # the last run of each stage
    card = {"trained_steps": steps, "configs": configs, "runs": stages, "eval": evals or {}}
    (dest / "nano.json").write_text(json.dumps(card, indent=2))
    return [*written, dest / "nano.json"]
