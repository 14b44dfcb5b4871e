"""Scale-out on Ray Serve (the `scale` extra): the same API, queue and page as `flux2 serve`, with model
replicas on many GPUs and machines and the job store in PostgreSQL.

Two deployments:
  Ingress    the FastAPI app of `create_app` (same routes, auth, limits, page). Its worker claims jobs
             from the shared store, as on one machine, but hands each batch to a Generator replica
             instead of running it; if that replica dies, the jobs go back to the queue (bounded by
             the store's MAX_ATTEMPTS) and run on another one.
  Generator  model replicas with a configurable CPU / GPU share. Several variants per replica, least
             recently used evicted (`@serve.multiplexed`); calls from all dispatchers are merged into
             batches of compatible jobs up to a pixel budget (`@serve.batch`). A replica writes step
             progress, heartbeat and results straight into the store, and stops at a cancelled job.

Settings come from a YAML file (`ScaleConfig`): replicas and autoscaling, resources, models, budget.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..variants import EMBEDDED_IDS
from .limits import DEFAULT_LIMITS
from .store import Job, Store
from .worker import Worker

log = logging.getLogger(__name__)


@dataclass
class ScaleConfig:
    """What `flux2 serve --ray --config FILE` reads (YAML); every field optional."""

    models: list[str] = field(default_factory=lambda: list(EMBEDDED_IDS))
    db: str | None = None  # postgresql://... (required across machines); None: SQLite under `data`
    data: str = "flux2-data"  # SQLite file (single machine) and, unless `files` is set, images
    files: str | None = None  # a folder every node sees (images and uploaded references)
    token: str | None = None
    allowed_hosts: list[str] = field(default_factory=list)  # Host names served besides loopback (see guard.py)
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None  # int8 / int4 / fp8 packing at load (`load(quantize=)`)
    vram: str | None = None  # accelerator memory a replica's phase may use, "8GB" (`load(vram_budget=)`); "auto":
    # 95% of what is free as the replica loads, or with num_gpus < 1 (replicas packed on a GPU) of its share
    compile: bool = False  # torch.compile the transformer's blocks (`load(compile=)`)
    vae_tile: int | None = None  # the VAE in tiles of this many pixels for larger images (`load(vae_tile=)`)
    threads: int = 1  # torch threads per CPU replica
    num_cpus: float = 1.0  # per Generator replica
    num_gpus: float = 0.0  # per Generator replica (e.g. 1, or 0.5 to pack two on a GPU)
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    max_models_per_replica: int = 2  # variants kept loaded per replica (LRU)
    pixel_budget: int = 8 * 128 * 128  # width * height * images per merged batch
    batch_wait_s: float = 0.02
    ingress_replicas: int = 1
    dispatch_loops: int = 4  # concurrent batches each ingress replica keeps in flight

    @classmethod
    def read(cls, path: str | Path | None, **overrides: Any) -> ScaleConfig:
        import yaml

        values = yaml.safe_load(Path(path).read_text()) if path else {}
        values = values or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown settings in {path}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values |= {k: v for k, v in overrides.items() if v is not None}
        return cls(**values)

    def autoscaling(self) -> dict:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": self.initial_replicas or self.min_replicas,
                "target_ongoing_requests": self.target_ongoing_requests}  # fmt: skip


def replica_vram(cfg: ScaleConfig) -> str | int | None:
    """The device budget a replica loads with: `vram`, except "auto" on a shared GPU (0 < num_gpus < 1), which is
    the replica's share of the GPU's memory in bytes (`loading.vram_bytes`): "auto" alone would let the first
    replica to load take 95% of the GPU, leaving the others nothing."""
    if isinstance(cfg.vram, str) and cfg.vram.strip().lower() == "auto" and 0 < cfg.num_gpus < 1:
        from ..loading import vram_bytes

        return vram_bytes("auto", cfg.device or "cuda", share=cfg.num_gpus)
    return cfg.vram


def _store(cfg: ScaleConfig) -> Store:
    return Store(cfg.data, db=cfg.db, files=cfg.files, shared=True)


def _pixels(request: tuple[str, list[str], int]) -> int:
    return request[2]


class Generator:
    """A model replica (see the module docstring). `run` takes job ids; returns who ran them."""

    def __init__(self, cfg: ScaleConfig) -> None:
        import torch
        from ray import serve

        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.store = _store(cfg)
        self.runner = serve.get_replica_context().replica_id.to_full_id_str()
        self.worker = Worker(self.store, loader=self.load, runner=self.runner)
        self.worker.preview_every = 0  # previews live in one process's memory: not across the cluster

    def load(self, model_id: str):
        from ..loading import load

        cfg = self.cfg
        return load(model_id, device=cfg.device, dtype=cfg.dtype, resident=True, quantize=cfg.quantize,
                    vram_budget=replica_vram(cfg), compile=cfg.compile, vae_tile=cfg.vae_tile)  # fmt: skip

    async def get_pipeline(self, model_id: str):  # wrapped by @serve.multiplexed in build_application
        return await asyncio.to_thread(self.load, model_id)

    async def run(self, job_ids: list[str], pixels: int) -> str:
        """Jobs claimed by an ingress; `pixels` (width x height x images, all jobs) sizes the batch."""
        from ray import serve

        return await self.batched((serve.get_multiplexed_model_id(), job_ids, pixels))

    async def batched(self, requests: list[tuple[str, list[str], int]]) -> list[str]:
        """Calls merged by @serve.batch (applied in build_application, under this same name, which is how
        Ray recognises a method): compatible jobs (same model, size, steps, ...) run as one call; batches
        run one at a time (max_concurrent_batches=1). Heartbeats come from the ingress that claimed them."""
        groups: list[list[Job]] = []
        for model_id, ids, _ in requests:
            for job in (self.store.get(i) for i in ids):
                if job is None or job.status != "running" or job.model != model_id:
                    continue
                for group in groups:
                    if group[0].batch_key == job.batch_key:
                        group.append(job)
                        break
                else:
                    groups.append([job])
        for group in groups:
            pipe = await self.get_pipeline(group[0].model)
            await asyncio.to_thread(self.worker._run_batch, group, pipe)
        return [self.runner] * len(requests)

    def check_health(self) -> None:
        self.store.count("running")  # the database answers


class RemoteWorker(Worker):
    """The ingress side: claims batches like the local worker and sends them to Generator replicas."""

    def __init__(self, store: Store, handle, loops: int) -> None:
        super().__init__(store, loader=_no_local_model, loops=loops)
        self.handle = handle

    def execute(self, batch: list[Job]) -> None:
        import ray.exceptions

        ids = [j.id for j in batch]
        pixels = sum(math.prod(j.settings.size) * j.settings.images for j in batch)
        try:
            self.handle.options(multiplexed_model_id=batch[0].model).run.remote(ids, pixels).result()
        except ray.exceptions.RayError as e:  # the replica died or was unreachable: not the jobs' fault
            log.warning("replica failed running %s: %s", ids, str(e).splitlines()[0] if str(e) else type(e))
            self.give_back(batch, "model replica died")


def _no_local_model(model_id: str):
    raise RuntimeError("the ingress runs no model: batches go to Generator replicas")


def build_application(cfg: ScaleConfig):
    """The Ray Serve application: Ingress (FastAPI) bound to the Generator deployment."""
    from ray import serve

    gen_cls = type("Generator", (Generator,), {})
    gen_cls.get_pipeline = serve.multiplexed(max_num_models_per_replica=cfg.max_models_per_replica)(
        Generator.get_pipeline
    )
    gen_cls.batched = serve.batch(max_batch_size=cfg.pixel_budget, batch_wait_timeout_s=cfg.batch_wait_s,
                                  batch_size_fn=lambda reqs: sum(min(_pixels(r), cfg.pixel_budget) for r in reqs))(
        Generator.batched
    )  # fmt: skip
    resources = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    generator = serve.deployment(gen_cls, name="Generator", ray_actor_options=resources,
                                 autoscaling_config=cfg.autoscaling(), max_ongoing_requests=32)  # fmt: skip

    def build_asgi_app():
        from ray import serve as ray_serve

        from .app import create_app

        handle = ray_serve.get_deployment_handle("Generator", app_name="flux2")
        store = _store(cfg)
        worker = RemoteWorker(store, handle, cfg.dispatch_loops)
        app = create_app(cfg.data, _no_local_model, token=cfg.token, limits=DEFAULT_LIMITS, models=cfg.models,
                         store=store, worker=worker, allowed_hosts=cfg.allowed_hosts or None)  # fmt: skip
        worker.start()  # runs for the replica's life (the app's lifespan may start/stop it again: counted)
        return app

    ingress = serve.deployment(serve.ingress(build_asgi_app)(), name="Ingress", num_replicas=cfg.ingress_replicas,
                               ray_actor_options={"num_cpus": 0.1})  # fmt: skip
    return ingress.bind(generator.bind(cfg))


def app_builder(args: dict) -> Any:
    """For `serve run` / KubeRay's `serveConfigV2`: `import_path: flux2studio.serve.ray_app:app_builder`,
    `args:` the same keys as the YAML file."""
    return build_application(ScaleConfig(**args))


def check_gpus(cfg: ScaleConfig, gpus: float, joined: bool) -> None:
    """Replicas asking for GPUs of a cluster that has none would wait for them for ever (the page says nothing):
    an error on a cluster started here, a warning on one joined (an autoscaler may add GPU nodes)."""
    if cfg.num_gpus > 0 and not gpus:
        problem = (f"num_gpus {cfg.num_gpus:g} per replica, and this Ray cluster has no GPU: set num_gpus: 0 for CPU "
                   "replicas")  # fmt: skip
        if not joined:
            raise ValueError(problem)
        log.warning("%s (unless its autoscaler adds GPU nodes)", problem)


def run(cfg: ScaleConfig, host: str, port: int, address: str | None = None, block: bool = True) -> None:
    """Start (or join) a Ray cluster, deploy, serve on host:port until interrupted."""
    import ray
    from ray import serve

    _store(cfg).close()  # the database and folders reachable from here (else: Ray's "deploy failed", cause in its logs)
    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    check_gpus(cfg, ray.cluster_resources().get("GPU", 0), joined=address is not None)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(cfg), name="flux2", route_prefix="/")
    if block:
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
