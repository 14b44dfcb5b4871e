"""The job store: jobs, their settings and results in SQLite (default, one machine) or PostgreSQL
(`postgresql://...`, shared by several servers); images as files in a folder (which may be shared).

A job is written before it is acknowledged, so an accepted job is never lost. Claiming is atomic (one
conditional UPDATE ... WHERE status='queued'; concurrent claimers of the same row see one winner, in
SQLite by its write lock, in PostgreSQL by its row lock), so two workers never run the same job. A
running job carries its runner and a heartbeat; a job whose runner stops beating goes back to the queue
(`reap`), and after MAX_ATTEMPTS runs it is failed rather than retried forever. The schema is versioned:
`MIGRATIONS` are applied in order at start (under an advisory lock in PostgreSQL). Files are addressed by
id only; no path ever comes from a request.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..settings import PER_IMAGE, GenerationSettings

MAX_ATTEMPTS = 3  # a job whose worker died this often is failed, not retried forever
LEASE = 60.0  # seconds without a heartbeat after which a running job is taken back

# (version, SQL) in order; {REAL} is an 8-byte float in both databases
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,          -- queued | running | done | failed | cancelled
    model TEXT NOT NULL,
    settings TEXT NOT NULL,        -- JSON: prompt, size, steps, seeds, ...
    created {REAL} NOT NULL,
    started {REAL},
    finished {REAL},
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    images TEXT NOT NULL DEFAULT '[]'  -- JSON list of image ids
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created);
""",
    ),
    (
        2,
        """
ALTER TABLE jobs ADD COLUMN runner TEXT;
ALTER TABLE jobs ADD COLUMN heartbeat {REAL};
""",
    ),
]
COLUMNS = ("id, status, model, settings, created, started, finished, step, steps, attempts, error, images, runner, "
           "heartbeat")  # fmt: skip


def runner_id() -> str:
    """Who runs a job: host, process and a random suffix (unique across servers and restarts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    model: str
    settings: GenerationSettings  # images by upload id
    created: float
    started: float | None
    finished: float | None
    step: int
    steps: int
    attempts: int
    error: str | None
    images: list[str]
    runner: str | None = None
    heartbeat: float | None = None
    loras: tuple[tuple[str, float], ...] = ()  # (file on the server, scale)

    @functools.cached_property
    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call: same model, LoRAs and every setting but the prompt,
        the seed and the count."""
        row = self.settings.to_json()
        return self.model, self.loras, *(row[k] for k in sorted(row) if k not in PER_IMAGE)

    def public(self) -> dict:
        """What clients see: the settings with LoRAs by name, and no path of the server in them or in the error
        (the stored row keeps the paths the worker loads)."""
        settings = self.settings.to_json() | {"loras": [[Path(path).stem, scale] for path, scale in self.loras]}
        return {
            "id": self.id,
            "status": self.status,
            "model": self.model,
            "settings": settings,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "progress": {"step": self.step, "steps": self.steps},
            "error": None if self.error is None else SERVER_PATH.sub(r"\1", self.error),
            "images": [f"/v1/images/{i}.png" for i in self.images],
        }


def lock_data(data: str | Path):
    """The SQLite store in `data` taken for this process (an open file holding an exclusive lock; released when
    the process ends): a second server on it, even one about to fail on a taken port, took the first one's
    running jobs back as if they had crashed (three such starts failed a job that went on to finish)."""
    try:
        import fcntl
    except ImportError:  # (Windows: not locked)
        return None
    Path(data).mkdir(parents=True, exist_ok=True)
    lock = open(Path(data) / "server.lock", "a+")  # noqa: SIM115  (held open: the lock lives as long as it)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        pid = lock.read().strip() or "?"
        lock.close()
        raise RuntimeError(f"{data} is in use by another flux2 serve (pid {pid}): stop it, or give another --data "
                           "(several servers share one queue through --db postgresql://...)") from None  # fmt: skip
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


CONNECT_TIMEOUT_S = 10  # a PostgreSQL host that does not answer: said after this, not after the OS's TCP timeout


def without_password(url: str) -> str:
    """A database URL as it may be shown: postgresql://user:secret@host/db -> postgresql://user:***@host/db (and
    a ?password= parameter's value)."""
    return re.sub(r"(password=)[^&\s]*", r"\1***", re.sub(r"(://[^:/@]+):[^/]*@", r"\1:***@", url))


class _Db:
    """One connection, serialised by a lock; `?` placeholders in both dialects."""

    def __init__(self, url: str) -> None:
        self.lock = threading.RLock()
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        if self.postgres:
            try:
                import psycopg
            except ImportError:
                raise ImportError("PostgreSQL needs psycopg: pip install 'flux2studio[scale]'") from None
            timeout = {} if "connect_timeout" in url else {"connect_timeout": CONNECT_TIMEOUT_S}  # (else: minutes)
            try:
                self.conn = psycopg.connect(url, autocommit=True, **timeout)
            except psycopg.OperationalError as e:  # (one line: psycopg's own message, without the password)
                cause = " ".join(str(e).split())
                raise ConnectionError(f"cannot reach the job store {without_password(url)}: {cause}") from None
        else:
            self.conn = sqlite3.connect(url.removeprefix("sqlite:///"), check_same_thread=False, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")  # readers never block the worker's writes
            self.conn.execute("PRAGMA synchronous=FULL")  # acknowledged means on disk
            self.conn.execute("PRAGMA busy_timeout=10000")

    def execute(self, query: str, args: tuple = ()):
        if self.postgres:
            query = query.replace("?", "%s")
        with self.lock:
            return self.conn.execute(query, args)

    def script(self, sql: str) -> None:
        sql = sql.replace("{REAL}", "DOUBLE PRECISION" if self.postgres else "REAL")
        for statement in (s.strip() for s in sql.split(";")):
            if statement:
                self.execute(statement)

    def migrate(self) -> int:
        """Apply the migrations not yet applied; returns the schema version."""
        with self.lock:
            if self.postgres:
                with self.conn.transaction():
                    self.conn.execute("SELECT pg_advisory_xact_lock(7265110)")  # one migrator at a time
                    return self._migrate()
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                version = self._migrate()
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
            return version

    def _migrate(self) -> int:
        self.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = self.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = row[0] or 0
        for version, sql in MIGRATIONS:
            if version > current:
                self.script(sql)
                self.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                current = version
        return current

    def close(self) -> None:
        with self.lock:
            self.conn.close()


class Store:
    """Jobs in SQLite (`db=None`: `DATA/jobs.sqlite3`) or PostgreSQL (`db="postgresql://..."`); images and
    uploaded references under `files` (default `DATA`; give every server of a PostgreSQL store the same
    shared folder)."""

    def __init__(
        self, data: str | Path, db: str | None = None, files: str | Path | None = None, shared: bool | None = None
    ) -> None:
        self.data = Path(data)
        self.data.mkdir(parents=True, exist_ok=True)
        root = Path(files) if files else self.data
        self.images_dir, self.refs_dir = root / "images", root / "refs"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.refs_dir.mkdir(parents=True, exist_ok=True)
        self.db = _Db(db or f"sqlite:///{self.data / 'jobs.sqlite3'}")
        self.version = self.db.migrate()
        self.shared = self.db.postgres if shared is None else shared  # other processes run jobs of this store

    def _row(self, row) -> Job:
        (id_, status, model, settings, created, started, finished, step, steps, attempts, error, images, runner,
         heartbeat) = row  # fmt: skip
        settings, loras = _settings(settings)
        return Job(id_, status, model, settings, created, started, finished, step, steps, attempts, error,
                   json.loads(images), runner, heartbeat, loras)  # fmt: skip

    def add(self, model: str, settings: GenerationSettings, steps: int, loras: Sequence[tuple[str, float]] = ()) -> Job:
        """Queue a job: its settings (images by upload id) and LoRAs (server files) in one versioned JSON row."""
        job_id = uuid.uuid4().hex
        row = settings.to_json() | {"loras": [[path, scale] for path, scale in loras]}
        self.db.execute(
            "INSERT INTO jobs (id, status, model, settings, created, steps) VALUES (?, 'queued', ?, ?, ?, ?)",
            (job_id, model, json.dumps(row), time.time(), steps),
        )
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        row = self.db.execute(f"SELECT {COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._row(row) if row else None

    def list(self, limit: int = 50, status: str | None = None) -> list[Job]:
        query, args = f"SELECT {COLUMNS} FROM jobs", ()
        if status:
            query, args = query + " WHERE status = ?", (status,)
        rows = self.db.execute(query + " ORDER BY created DESC LIMIT ?", (*args, limit)).fetchall()
        return [self._row(r) for r in rows]

    def count(self, *statuses: str) -> int:
        marks = ",".join("?" * len(statuses))
        return self.db.execute(f"SELECT COUNT(*) FROM jobs WHERE status IN ({marks})", statuses).fetchone()[0]

    def claim(self, like: Job | None = None, runner: str = "") -> Job | None:
        """Atomically take the oldest queued job (optionally one that can share a call with `like`)."""
        rows = self.db.execute(f"SELECT {COLUMNS} FROM jobs WHERE status = 'queued' ORDER BY created").fetchall()
        now = time.time()
        key = like.batch_key if like is not None else None
        for row in rows:
            job_id = row[0]
            if key is not None and (row[2] != like.model or self._row(row).batch_key != key):
                continue
            cur = self.db.execute(
                "UPDATE jobs SET status='running', started=?, heartbeat=?, runner=?, attempts=attempts+1 "
                "WHERE id=? AND status='queued'",
                (now, now, runner, job_id),
            )
            if cur.rowcount == 1:
                return self.get(job_id)
        return None

    def progress(self, job_id: str, step: int, steps: int, runner: str | None = None) -> None:
        """Step progress; also the job's heartbeat (and, from a remote replica, who runs it now)."""
        if runner is None:
            self.db.execute(
                "UPDATE jobs SET step=?, steps=?, heartbeat=? WHERE id=?", (step, steps, time.time(), job_id)
            )
        else:
            self.db.execute("UPDATE jobs SET step=?, steps=?, heartbeat=?, runner=? WHERE id=?",
                            (step, steps, time.time(), runner, job_id))  # fmt: skip

    def beat(self, job_ids: list[str]) -> None:
        """Heartbeat for running jobs (a worker calls this while a long step runs)."""
        for job_id in job_ids:
            self.db.execute("UPDATE jobs SET heartbeat=? WHERE id=? AND status='running'", (time.time(), job_id))

    def save_images(self, images: list[bytes]) -> list[str]:
        ids = [uuid.uuid4().hex for _ in images]
        for image_id, png in zip(ids, images, strict=True):
            _write_whole(self.images_dir / f"{image_id}.png", png)
        return ids

    def finish(self, job_id: str, images: list[bytes]) -> Job:
        ids = self.save_images(images)
        self.db.execute(
            "UPDATE jobs SET status='done', finished=?, images=? WHERE id=? AND status='running'",
            (time.time(), json.dumps(ids), job_id),
        )
        return self.get(job_id)

    def fail(self, job_id: str, error: str) -> None:
        self.db.execute("UPDATE jobs SET status='failed', finished=?, error=? WHERE id=?", (time.time(), error, job_id))

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job now, or mark a running one so its worker stops at the next step."""
        cur = self.db.execute(
            "UPDATE jobs SET status='cancelled', finished=? WHERE id=? AND status IN ('queued', 'running')",
            (time.time(), job_id),
        )
        return cur.rowcount == 1

    def requeue(self, job_id: str, refund: bool = False, runner: str | None = None) -> None:
        """A running job goes back to the queue (its batch was interrupted, or its runner died); `refund`: the
        attempt does not count (a server stopping, a batch-mate cancelled: not a failure of this job's run);
        `runner`: only while that runner has it (not once its lease ran out and another server claimed it)."""
        attempts = "attempts=CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, " if refund else ""  # (both SQLs)
        mine = " AND runner=?" if runner is not None else ""
        self.db.execute(f"UPDATE jobs SET status='queued', step=0, {attempts}runner=NULL WHERE id=? AND "
                        f"status='running'{mine}", (job_id, *([runner] if runner is not None else [])))  # fmt: skip

    def _take_back(self, where: str, args: tuple) -> int:
        self.db.execute(
            f"UPDATE jobs SET status='failed', error='worker died too often', finished=? "
            f"WHERE status='running' AND attempts >= ? AND {where}",
            (time.time(), MAX_ATTEMPTS, *args),
        )
        cur = self.db.execute(
            f"UPDATE jobs SET status='queued', step=0, runner=NULL WHERE status='running' AND {where}", args
        )
        return cur.rowcount

    def recover(self) -> int:
        """At start: jobs left running by a crash go back to the queue (or fail after MAX_ATTEMPTS).

        A SQLite store belongs to this server alone, so every running job is orphaned; in a shared
        PostgreSQL store only those whose runner stopped beating are (other servers are running theirs).
        """
        if self.shared:
            return self.reap()
        return self._take_back("1=1", ())

    def reap(self, lease: float = LEASE) -> int:
        """Running jobs without a heartbeat for `lease` seconds go back to the queue. Returns how many."""
        return self._take_back("(heartbeat IS NULL OR heartbeat < ?)", (time.time() - lease,))

    def image_path(self, image_id: str) -> Path | None:
        if not _is_id(image_id):  # ids only: nothing path-like reaches the disk
            return None
        path = self.images_dir / f"{image_id}.png"
        return path if path.is_file() else None

    def save_ref(self, data: bytes, suffix: str) -> str:
        """Store an uploaded reference image's bytes as they came (validated by the caller); its new id."""
        ref_id = uuid.uuid4().hex
        _write_whole(self.refs_dir / f"{ref_id}{suffix}", data)
        return ref_id

    def drop_refs(self, ref_ids: list[str]) -> None:
        """Delete uploads a refused request stored (no job names them)."""
        for ref_id in ref_ids:
            if (path := self.ref_path(ref_id)) is not None:
                path.unlink(missing_ok=True)

    def ref_path(self, ref_id: str) -> Path | None:
        """The file of an uploaded reference (any of UPLOAD_SUFFIXES; older servers wrote PNG), or None."""
        if not _is_id(ref_id):
            return None
        return next((p for s in UPLOAD_SUFFIXES if (p := self.refs_dir / f"{ref_id}{s}").is_file()), None)

    def disk_bytes(self) -> int:
        """Bytes of images and uploads on disk (what `Limits.max_disk_bytes` bounds)."""
        total = 0
        for d in (self.images_dir, self.refs_dir):
            for entry in os.scandir(d):
                with contextlib.suppress(FileNotFoundError):  # renamed or removed since the listing
                    total += entry.stat().st_size if entry.is_file() else 0
        return total

    def expire_refs(self, ttl: float) -> int:
        """Delete uploads older than `ttl` seconds that no queued or running job names. Returns how many."""
        active = [*self.list(10**6, "queued"), *self.list(10**6, "running")]
        needed = {r for j in active for r in upload_ids(j.settings)}
        cutoff, removed = time.time() - ttl, 0
        for entry in os.scandir(self.refs_dir):
            if entry.name.split(".", 1)[0] in needed:
                continue
            with contextlib.suppress(FileNotFoundError):  # gone since the listing (another server, a rename)
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def expire_jobs(self, age: float) -> int:
        """Delete finished jobs (and their images) that finished more than `age` seconds ago. Returns how many."""
        rows = self.db.execute(
            "SELECT id FROM jobs WHERE status IN ('done', 'failed', 'cancelled') AND finished < ?", (time.time() - age,)
        ).fetchall()
        return sum(self.delete(job_id) for (job_id,) in rows)

    def delete(self, job_id: str) -> bool:
        """Remove a finished (done, failed or cancelled) job and its images. False if there is no such job or it
        is still queued or running (cancel it first)."""
        job = self.get(job_id)
        if job is None or job.status in ("queued", "running"):
            return False
        self.db.execute("DELETE FROM jobs WHERE id = ? AND status IN ('done', 'failed', 'cancelled')", (job_id,))
        for image_id in job.images:
            if (path := self.image_path(image_id)) is not None:
                path.unlink(missing_ok=True)
        return True

    def close(self) -> None:
        self.db.close()


SERVER_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\"]+/)+([^\s/'\"]*)")  # /srv/loras/x.safetensors -> x.safetensors
UPLOAD_SUFFIXES = (".png", ".jpg", ".webp")  # uploads are kept in the encoding they came in


def _write_whole(path: Path, data: bytes) -> None:
    """Written aside, then renamed: a reader (another server of a shared folder) never sees half a file."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    tmp.replace(path)


def _is_id(value: str) -> bool:
    return len(value) == 32 and value.isascii() and value.isalnum()


def upload_ids(settings: GenerationSettings) -> list[str]:
    """The uploads a job's settings name: references, and the start image and mask of an edit."""
    return [*settings.refs, *(name for name in (settings.image, settings.mask) if name)]


def _settings(text: str) -> tuple[GenerationSettings, tuple[tuple[str, float], ...]]:
    """A stored row (any version: `GenerationSettings.from_json`) and the job's LoRAs."""
    row = json.loads(text)
    loras = tuple((path, scale) for path, scale in row.pop("loras", None) or ())
    return GenerationSettings.from_json(row), loras
