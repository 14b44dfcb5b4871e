"""The worker: takes jobs from the store, keeps one model loaded (swapped on demand), batches compatible
jobs into one pipeline call, reports progress per step, honours cancellation, writes PNGs with metadata."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable

from PIL import Image

from ..images import open_image, open_reference
from ..pipeline import Pipeline
from ..settings import GenerationSettings
from .store import LEASE, MAX_ATTEMPTS, Job, Store, runner_id

log = logging.getLogger(__name__)
MAX_BATCH_IMAGES = 8  # images per pipeline call when batching compatible jobs


class Cancelled(Exception):
    pass


class Stopping(Exception):
    """The server is stopping: the batch goes back to the queue, its attempt not counted."""


class Worker:
    """Claims jobs and runs them. `loops` claim loops run side by side (1 for a local model; more when
    `execute` sends batches to remote replicas); a heartbeat thread keeps the running jobs' leases fresh
    and takes back the jobs of runners that died (`Store.reap`)."""

    def __init__(
        self, store: Store, loader: Callable[[str], Pipeline], poll: float = 0.2, runner: str | None = None,
        loops: int = 1,
    ) -> None:  # fmt: skip
        self.store, self.loader, self.poll = store, loader, poll
        self.runner = runner or runner_id()
        self.loops = loops
        self.active: set[str] = set()  # ids of the jobs this worker is running now
        self.pipe: Pipeline | None = None
        self.model_id: str | None = None
        self.previews: dict[str, bytes] = {}  # job id -> JPEG of its latest step (memory only, dropped when done)
        self.preview_every = 0.4  # seconds between previews of a batch; 0 disables them
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._users = 0  # nested app lifespans (test clients) share one running worker
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        with self._lock:
            self._users += 1
            if not any(t.is_alive() for t in self.threads):
                self._stop.clear()
                self.threads = [threading.Thread(target=self._run, name=f"flux2-worker-{i}", daemon=True)
                                for i in range(self.loops)]  # fmt: skip
                self.threads.append(threading.Thread(target=self._heartbeat, name="flux2-heartbeat", daemon=True))
                for t in self.threads:
                    t.start()

    def begin_stop(self) -> None:
        """The server begins to stop (its signal): no job is claimed from now on, the running batch ends at its
        next step and goes back to the queue (its attempt not counted), requests waiting on jobs answer."""
        self._stop.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users or not self.threads:
                return
            self._stop.set()
            self._wake.set()
            threads = list(self.threads)
        for t in threads:
            t.join(timeout=30)

    def _heartbeat(self) -> None:
        """Every few seconds: keep this worker's jobs alive, take back the jobs of dead runners."""
        while not self._stop.wait(min(5.0, LEASE / 4)):
            try:
                self.store.beat(list(self.active))
                if self.store.reap():
                    self.notify()
            except Exception:  # the database may be restarting: try again at the next beat
                log.exception("heartbeat failed")

    def notify(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self.store.claim(runner=self.runner)
            if job is None:
                self._wake.wait(self.poll)
                self._wake.clear()
                continue
            batch = [job]
            while sum(j.settings.num_images for j in batch) < MAX_BATCH_IMAGES:
                more = self.store.claim(like=job, runner=self.runner)
                if more is None:
                    break
                batch.append(more)
            self.active |= {j.id for j in batch}
            try:
                self.execute(batch)
            except Exception as e:  # a bug of ours must not stop the worker
                log.exception("worker: a batch ended in an error")
                self.give_back(batch, f"an internal error ({type(e).__name__})")
            finally:
                self.active -= {j.id for j in batch}

    def execute(self, batch: list[Job]) -> None:
        """Run a claimed batch here (a remote dispatcher overrides this)."""
        self._run_batch(batch)

    def _pipeline(self, model_id: str) -> Pipeline:
        if self.model_id != model_id:  # one model at a time: free the old one before loading the next
            self.pipe, self.model_id = None, None
            self.pipe, self.model_id = self.loader(model_id), model_id
        return self.pipe

    def _run_batch(self, batch: list[Job], pipe: Pipeline | None = None) -> None:
        try:
            pipe = pipe or self._pipeline(batch[0].model)
            s = self.opened(batch)
            if batch[0].loras or pipe.loras:
                pipe.set_loras(list(batch[0].loras))

            last = [0.0]

            def progress(i: int, total: int, x0) -> None:
                # a stop ends a local batch at its next step (it ran on through a stop, then was thrown away);
                # not a hosted one (its images are paid for as they come) nor one with only its decode left
                if self._stop.is_set() and isinstance(pipe, Pipeline) and i + 1 < total:
                    raise Stopping
                for j in batch:
                    if self._status(j.id) in ("cancelled", None):  # None: cancelled, then deleted
                        raise Cancelled(j.id)
                if x0 is not None and i + 1 < total and time.monotonic() - last[0] >= self.preview_every > 0:
                    self._previews(pipe, batch, x0, *batch[0].settings.size)
                    last[0] = time.monotonic()
                for j in batch:
                    self.store.progress(j.id, i + 1, total, runner=self.runner)

            images = pipe(s, callback=progress)
        except (Cancelled, Stopping) as e:
            self._drop_previews(batch)
            for j in batch:  # a cancelled job stays cancelled; the others go back to the queue, the try not counted
                self.store.requeue(j.id, refund=True, runner=self.runner)
            if isinstance(e, Stopping):
                log.warning("stopping: %d job(s) of the running batch go back to the queue", len(batch))
            return
        except Exception as e:  # a job's failure is recorded, never crashes the worker
            made = dict(getattr(e, "images", []))
            if len(batch) > 1 and not made and isinstance(pipe, Pipeline):
                # one job's input may have failed them all: run each on its own (a local model that loaded;
                # not a hosted batch, whose tasks were submitted and billed, nor a model that failed to load)
                log.warning("a batch of %d jobs failed (%s): running them one by one", len(batch), e)
                for j in batch:
                    if self._status(j.id) == "running":  # not one cancelled (or deleted) meanwhile
                        self._run_batch([j], pipe)
                return
            log.exception("job batch failed")
            # a hosted batch may fail part-way: the jobs whose images were all made still finish
            self._settle(batch, made, str(e).splitlines()[0] if str(e) else type(e).__name__)
            return
        self._settle(batch, dict(enumerate(images)), "")

    def give_back(self, batch: list[Job], reason: str) -> None:
        """The jobs of a batch that ended for no fault of theirs (a replica died, an error of ours) go back to the
        queue; one tried MAX_ATTEMPTS times fails with `reason`, not retried forever. Never raises (a store that
        cannot answer now: the jobs' leases run out and `reap` takes them back)."""
        self._drop_previews(batch)
        for j in batch:
            try:
                now = self.store.get(j.id)
                if now is not None and now.status == "running":
                    if now.attempts >= MAX_ATTEMPTS:
                        self.store.fail(j.id, f"{reason} {now.attempts} times running this job")
                    else:
                        self.store.requeue(j.id)
            except Exception:
                log.exception("could not give job %s back (its lease runs out, then it is taken back)", j.id)
        self.notify()

    def _status(self, job_id: str) -> str | None:
        """A job's status now; None once it is deleted (a cancelled job may be, while its batch still runs)."""
        job = self.store.get(job_id)
        return None if job is None else job.status

    def opened(self, batch: list[Job]) -> GenerationSettings:
        """One call's settings for a batch of compatible jobs: every job's prompts and seeds, the uploads opened,
        and an outpainting's size left to its start image and expansion (the canvas)."""
        s = batch[0].settings
        path = self.store.ref_path
        return s.replace(
            prompt=[p for j in batch for p in j.settings.prompts for _ in range(j.settings.num_images)],
            seeds=[j.settings.seed + i for j in batch for i in range(j.settings.images)],
            num_images=1,
            refs=[open_reference(path(r)) for r in s.refs],
            image=open_image(path(s.image)) if s.image else None,
            mask=open_image(path(s.mask)) if s.mask else None,
            size=None if s.expand else s.size,
        )

    def _settle(self, batch: list[Job], made: dict[int, Image.Image], error: str) -> None:
        """Finish each job whose images (by index in the batch's call) are all in `made`; fail the others."""
        self._drop_previews(batch)
        k = 0
        for j in batch:
            wanted = range(k, k + j.settings.num_images)
            if all(i in made for i in wanted):
                self.store.finish(j.id, [_png(made[i]) for i in wanted])
            else:
                self.store.fail(j.id, error)
            k += len(wanted)

    def _previews(self, pipe, batch: list[Job], x0, width: int, height: int) -> None:
        """The first image of each job, as the step's x0 estimate decoded (small JPEG); never fails a job."""
        preview = getattr(pipe, "preview", None)
        if preview is None or width * height > 1024 * 1024:
            return
        k = 0
        for j in batch:
            try:
                image = preview(x0, width, height, index=k)
            except Exception:  # a preview is a nicety: log, keep generating
                log.exception("preview failed")
                return
            if image is None:
                return
            image.thumbnail((256, 256))
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=80)
            self.previews[j.id] = buf.getvalue()
            k += j.settings.num_images

    def _drop_previews(self, batch: list[Job]) -> None:
        for j in batch:
            self.previews.pop(j.id, None)


def _png(image: Image.Image) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key in ("parameters", "flux2"):
        if key in image.info:
            info.add_text(key, image.info[key])
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
