"""The job store: jobs, their settings and results in SQLite; images as files beside it.

A job is written before it is acknowledged, so an accepted job is never lost: after a crash, `recover()`
puts jobs that were running back in the queue. Claiming is atomic (one UPDATE ... WHERE status='queued'),
so two workers never run the same job. Files are addressed by id only; no path ever comes from a request.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,          -- queued | running | done | failed | cancelled
    model TEXT NOT NULL,
    settings TEXT NOT NULL,        -- JSON: prompt, size, steps, seeds, ...
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    images TEXT NOT NULL DEFAULT '[]'  -- JSON list of image ids
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created);
"""
MAX_ATTEMPTS = 3  # a job whose worker died this often is failed, not retried forever


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    model: str
    settings: dict
    created: float
    started: float | None
    finished: float | None
    step: int
    steps: int
    attempts: int
    error: str | None
    images: list[str]

    def public(self) -> dict:
        return {
            "id": self.id,
            "status": self.status,
            "model": self.model,
            "settings": self.settings,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "progress": {"step": self.step, "steps": self.steps},
            "error": self.error,
            "images": [f"/v1/images/{i}.png" for i in self.images],
        }


class Store:
    def __init__(self, data: str | Path) -> None:
        self.data = Path(data)
        self.images_dir = self.data / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.data / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers never block the worker's writes
        self._db.execute("PRAGMA synchronous=FULL")  # acknowledged means on disk
        self._db.executescript(SCHEMA)

    def _row(self, row) -> Job:
        (id_, status, model, settings, created, started, finished, step, steps, attempts, error, images) = row
        return Job(id_, status, model, json.loads(settings), created, started, finished, step, steps, attempts, error,
                   json.loads(images))  # fmt: skip

    def add(self, model: str, settings: dict, steps: int) -> Job:
        job_id = uuid.uuid4().hex
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, status, model, settings, created, steps) VALUES (?, 'queued', ?, ?, ?, ?)",
                (job_id, model, json.dumps(settings), time.time(), steps),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._row(row) if row else None

    def list(self, limit: int = 50, status: str | None = None) -> list[Job]:
        query, args = "SELECT * FROM jobs", ()
        if status:
            query, args = query + " WHERE status = ?", (status,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created DESC LIMIT ?", (*args, limit)).fetchall()
        return [self._row(r) for r in rows]

    def count(self, *statuses: str) -> int:
        marks = ",".join("?" * len(statuses))
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE status IN ({marks})", statuses).fetchone()[0]

    def claim(self, compatible: dict | None = None) -> Job | None:
        """Atomically take the oldest queued job (optionally one whose model and key settings match)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, model, settings FROM jobs WHERE status = 'queued' ORDER BY created"
            ).fetchall()
            for job_id, model, settings in rows:
                if compatible is not None and not _compatible(compatible, model, json.loads(settings)):
                    continue
                cur = self._db.execute(
                    "UPDATE jobs SET status='running', started=?, attempts=attempts+1 WHERE id=? AND status='queued'",
                    (time.time(), job_id),
                )
                if cur.rowcount == 1:
                    break
            else:
                return None
        return self.get(job_id)

    def progress(self, job_id: str, step: int, steps: int) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET step=?, steps=? WHERE id=?", (step, steps, job_id))

    def finish(self, job_id: str, images: list[bytes]) -> Job:
        ids = []
        for png in images:
            image_id = uuid.uuid4().hex
            tmp = self.images_dir / f"{image_id}.png.partial"
            tmp.write_bytes(png)
            tmp.replace(self.images_dir / f"{image_id}.png")
            ids.append(image_id)
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status='done', finished=?, images=? WHERE id=? AND status='running'",
                (time.time(), json.dumps(ids), job_id),
            )
        return self.get(job_id)

    def fail(self, job_id: str, error: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status='failed', finished=?, error=? WHERE id=?", (time.time(), error, job_id)
            )

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job now, or mark a running one so its worker stops at the next step."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status='cancelled', finished=? WHERE id=? AND status IN ('queued', 'running')",
                (time.time(), job_id),
            )
        return cur.rowcount == 1

    def requeue(self, job_id: str) -> None:
        """A running job goes back to the queue (its batch was interrupted, not the job itself)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status='queued', step=0 WHERE id=? AND status='running'", (job_id,))

    def recover(self) -> int:
        """After a crash: running jobs go back to the queue (or fail after MAX_ATTEMPTS). Returns how many."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status='failed', error='worker died too often', finished=? "
                "WHERE status='running' AND attempts >= ?",
                (time.time(), MAX_ATTEMPTS),
            )
            cur = self._db.execute("UPDATE jobs SET status='queued', step=0 WHERE status='running'")
        return cur.rowcount

    def image_path(self, image_id: str) -> Path | None:
        if not image_id.isalnum() or len(image_id) != 32:  # ids only: nothing path-like reaches the disk
            return None
        path = self.images_dir / f"{image_id}.png"
        return path if path.is_file() else None


def _compatible(a: dict, model: str, settings: dict) -> bool:
    """Jobs that can share one pipeline call: same model and every setting but prompt and seed."""
    keys = ("width", "height", "steps", "guidance", "negative_prompt", "refs", "loras")
    return a["model"] == model and all(a["settings"].get(k) == settings.get(k) for k in keys)
