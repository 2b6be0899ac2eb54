"""Durable state of the jobs API: files, jobs, events and checkpoints in one SQL database via SQLAlchemy Core.

SQLite (WAL mode) under the data directory by default; any SQLAlchemy URL works the same (PostgreSQL:
`postgresql+psycopg://...`). Only the server process writes here: training children report through files in
the job folder, which the server's workers turn into rows. Rows carry a monotonically increasing `seq` so
listings page by index (`WHERE owner = ? AND seq < ?`) and stay fast with many rows.
"""

from __future__ import annotations

import secrets
import string
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, RowMapping

metadata = MetaData()

files = Table(
    "files", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), unique=True, nullable=False),
    Column("owner", String(200), nullable=False),
    Column("filename", String(512), nullable=False),
    Column("purpose", String(64), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("status", String(32), nullable=False),
    Column("storage", String(128), nullable=False),  # generated name under data_dir/files
    Column("deleted", Boolean, nullable=False, default=False),
    Index("ix_files_owner_seq", "owner", "seq"),
)

jobs = Table(
    "jobs", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), unique=True, nullable=False),
    Column("owner", String(200), nullable=False),
    Column("model", String(512), nullable=False),
    Column("training_file", String(64), nullable=False),
    Column("validation_file", String(64)),
    Column("status", String(32), nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("started_at", Integer),
    Column("finished_at", Integer),
    Column("fine_tuned_model", String(1024)),
    Column("suffix", String(64)),
    Column("seed", Integer, nullable=False),
    Column("hyperparameters", JSON, nullable=False),  # as requested ("auto" kept until resolved)
    Column("method", JSON, nullable=False),
    Column("job_metadata", JSON),
    Column("options", JSON, nullable=False),  # tunelab's own options, validated
    Column("error", JSON),
    Column("trained_tokens", BigInteger),
    Column("estimated_finish", Integer),
    Column("result_files", JSON, nullable=False),
    Column("pause_requested", Boolean, nullable=False, default=False),
    Column("step", Integer, nullable=False, default=0),
    Column("total_steps", Integer),
    Column("metrics_offset", BigInteger, nullable=False, default=0),  # bytes of metrics.jsonl turned into events
    Column("last_train_step", Integer, nullable=False, default=0),
    Column("last_valid_step", Integer, nullable=False, default=-1),
    Column("pid", Integer),
    Index("ix_jobs_owner_seq", "owner", "seq"),
    Index("ix_jobs_status_seq", "status", "seq"),
)

events = Table(
    "events", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), unique=True, nullable=False),
    Column("job_id", String(64), nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("level", String(8), nullable=False),
    Column("type", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", JSON),
    Index("ix_events_job_seq", "job_id", "seq"),
)

checkpoints = Table(
    "checkpoints", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), unique=True, nullable=False),
    Column("job_id", String(64), nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("step_number", Integer, nullable=False),
    Column("model_name", String(1024), nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("path", String(1024), nullable=False),
    Index("ix_checkpoints_job_seq", "job_id", "seq"),
)

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(n))


def now() -> int:
    return int(time.time())


def database_url(data_dir: Path, url: str | None) -> str:
    return url or f"sqlite:///{(data_dir / 'jobs.db').resolve()}"


class Store:
    """A thin, thread-safe handle on the database. Methods return plain row mappings."""

    def __init__(self, url: str) -> None:
        self.url = url
        sqlite = url.startswith("sqlite")
        self.engine: Engine = create_engine(
            url, future=True, connect_args={"check_same_thread": False, "timeout": 30} if sqlite else {},
            pool_pre_ping=not sqlite,
        )
        if sqlite:
            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn: Any, _: Any) -> None:
                cur = dbapi_conn.cursor()
                # WAL: readers never wait for the writer; synchronous=NORMAL is durable across process kills.
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()
        metadata.create_all(self.engine)
        # SQLite allows one writer at a time; serialising our own writes avoids "database is locked" retries.
        self._write_lock = threading.RLock()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ generic helpers
    def get(self, table: Table, id_: str) -> RowMapping | None:
        with self.read() as c:
            return c.execute(select(table).where(table.c.id == id_)).mappings().first()

    def insert(self, table: Table, **values: Any) -> RowMapping:
        with self.write() as c:
            c.execute(insert(table).values(**values))
            row = c.execute(select(table).where(table.c.id == values["id"])).mappings().first()
        assert row is not None
        return row

    def update_job(self, job_id: str, *, only_if_status: tuple[str, ...] | None = None, **values: Any) -> bool:
        """Update a job; with `only_if_status`, only while it is in one of those states (a compare-and-set,
        atomic in SQL, so it is safe across threads and processes). Returns whether a row changed."""
        stmt = update(jobs).where(jobs.c.id == job_id)
        if only_if_status:
            stmt = stmt.where(jobs.c.status.in_(only_if_status))
        with self.write() as c:
            return bool(c.execute(stmt.values(**values)).rowcount)

    def page(
        self, table: Table, *, where: list[Any], after: str | None, limit: int, newest_first: bool = True,
        after_scope: Any = None,
    ) -> tuple[list[RowMapping], bool]:
        """One page of rows by `seq`, after the row whose id is `after`; returns (rows, has_more)."""
        with self.read() as c:
            q = select(table).where(*where)
            if after:
                anchor = c.execute(select(table.c.seq).where(table.c.id == after, *where)).scalar()
                if anchor is None:
                    return [], False
                q = q.where(table.c.seq < anchor if newest_first else table.c.seq > anchor)
            q = q.order_by(table.c.seq.desc() if newest_first else table.c.seq.asc()).limit(limit + 1)
            rows = list(c.execute(q).mappings())
        return rows[:limit], len(rows) > limit

    def add_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                  data: dict[str, Any] | None = None, conn: Connection | None = None) -> None:
        values = dict(id=new_id("ftevent-"), job_id=job_id, created_at=now(), level=level, type=type,
                      message=message, data=data)
        if conn is not None:
            conn.execute(insert(events).values(**values))
            return
        with self.write() as c:
            c.execute(insert(events).values(**values))

    def jobs_in(self, *statuses: str, limit: int | None = None) -> list[RowMapping]:
        """Jobs in these states, oldest first (the queue order); `limit` keeps the workers' polling cheap
        however many jobs wait."""
        q = select(jobs).where(jobs.c.status.in_(statuses)).order_by(jobs.c.seq)
        with self.read() as c:
            return list(c.execute(q if limit is None else q.limit(limit)).mappings())

    def queue_heads(self, status: str) -> list[RowMapping]:
        """The oldest job in `status` of each owner: the heads of the per-owner queues (fair scheduling)."""
        heads = (select(func.min(jobs.c.seq).label("seq")).where(jobs.c.status == status)
                 .group_by(jobs.c.owner).subquery())
        with self.read() as c:
            return list(c.execute(select(jobs).join(heads, jobs.c.seq == heads.c.seq)
                                  .order_by(jobs.c.seq)).mappings())

    def count_by_owner(self, status: str) -> dict[str, int]:
        with self.read() as c:
            rows = c.execute(select(jobs.c.owner, func.count()).where(jobs.c.status == status)
                             .group_by(jobs.c.owner)).all()
        return {str(owner): int(n) for owner, n in rows}

    def checkpoints_of(self, job_id: str) -> list[RowMapping]:
        with self.read() as c:
            return list(c.execute(select(checkpoints).where(checkpoints.c.job_id == job_id)
                                  .order_by(checkpoints.c.seq)).mappings())
