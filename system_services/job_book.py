"""The jobs apps scheduled and the results of their runs: two tables in the scheduler's SQLite file.

apscheduler's store (job_store.py) knows when a job runs next; this book knows what it is (whose, which
agent, on what input, with which trigger and options) and what its last runs gave. A job's rows are
removed together when it is cancelled; a finished one-off job stays listed, with its results, until then.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class JobBook:
    """The jobs apps scheduled and their results, in SQLite (the same file as apscheduler's store)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.executescript(
            "CREATE TABLE IF NOT EXISTS llmos_jobs (id TEXT PRIMARY KEY, uid INTEGER, app_id TEXT NOT NULL,"
            " agent TEXT NOT NULL, input TEXT NOT NULL, trigger TEXT NOT NULL, options TEXT NOT NULL,"
            " created TEXT NOT NULL);"
            "CREATE TABLE IF NOT EXISTS llmos_results (job_id TEXT NOT NULL, ran_at TEXT NOT NULL,"
            " outcome TEXT NOT NULL, steps TEXT NOT NULL);"
            "CREATE INDEX IF NOT EXISTS results_by_job ON llmos_results (job_id, ran_at);"
        )

    def add(self, uid: int | None, app_id: str, agent: str, text: str, trigger: dict, options: dict) -> str:
        job_id = "j" + secrets.token_hex(6)
        self.db.execute(
            "INSERT INTO llmos_jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, uid, app_id, agent, text, json.dumps(trigger), json.dumps(options), _now()),
        )
        return job_id

    def get(self, job_id: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM llmos_jobs WHERE id = ?", (job_id,)).fetchone()

    def owned(self, uid: int | None, app_id: str) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT * FROM llmos_jobs WHERE uid IS ? AND app_id = ? ORDER BY created", (uid, app_id)
        ).fetchall()

    def remove(self, job_id: str) -> None:
        self.db.execute("DELETE FROM llmos_results WHERE job_id = ?", (job_id,))
        self.db.execute("DELETE FROM llmos_jobs WHERE id = ?", (job_id,))

    def add_result(self, job_id: str, outcome: dict, steps: list[dict], keep: int) -> str:
        ran_at = _now()
        self.db.execute(
            "INSERT INTO llmos_results VALUES (?, ?, ?, ?)",
            (job_id, ran_at, json.dumps(outcome), json.dumps(steps)),
        )
        self.db.execute(
            "DELETE FROM llmos_results WHERE job_id = ? AND rowid NOT IN (SELECT rowid FROM llmos_results"
            " WHERE job_id = ? ORDER BY ran_at DESC, rowid DESC LIMIT ?)",
            (job_id, job_id, keep),
        )
        return ran_at

    def summary(self, job_id: str) -> tuple[int, dict[str, Any] | None]:
        """How many results are kept, and the last one without its step log."""
        (kept,) = self.db.execute("SELECT COUNT(*) FROM llmos_results WHERE job_id = ?", (job_id,)).fetchone()
        row = self.db.execute(
            "SELECT ran_at, outcome FROM llmos_results WHERE job_id = ?"
            " ORDER BY ran_at DESC, rowid DESC LIMIT 1",
            (job_id,),
        ).fetchone()
        return kept, ({"ran_at": row["ran_at"], **json.loads(row["outcome"])} if row else None)

    def results(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT ran_at, outcome, steps FROM llmos_results WHERE job_id = ? ORDER BY ran_at, rowid",
            (job_id,),
        )
        return [
            {"ran_at": r["ran_at"], **json.loads(r["outcome"]), "step_log": json.loads(r["steps"])}
            for r in rows
        ]

    def close(self) -> None:
        self.db.close()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
