"""`pgembed.Client`: the Python API, with the same verbs as the command line."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg

from pgembed import aliases, audit, db, migrate, pipelines, writethrough
from pgembed.attribution import Attribution
from pgembed.evaluation.runs import EvalRun, run_evaluation
from pgembed.pipelines import PipelineOptions
from pgembed.search import Filter, Hit, search, search_with_vector
from pgembed.worker import Worker, WorkerConfig, WorkerStats


class Client:
    """A handle on one database. With no DSN: PGEMBED_DSN, else libpq's PG* variables, else
    (nothing configured) the embedded server."""

    def __init__(self, dsn: str | None = None) -> None:
        self.target = db.resolve(dsn)
        self.dsn = self.target.dsn
        self._conn: psycopg.Connection | None = None

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.dsn)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def init(self) -> None:
        """Create or upgrade the pgembed schema (alembic upgrade head); safe to repeat."""
        migrate.upgrade(self.dsn)
        db.register_vector(self.conn)

    def create_pipeline(self, source: str, content: str, model: str, **options: Any) -> str:
        return pipelines.create(self.conn, source, content, model, PipelineOptions(**options))

    def drop_pipeline(self, name: str) -> None:
        pipelines.drop(self.conn, name)

    def pipelines(self) -> list[dict[str, Any]]:
        return pipelines.list_all(self.conn)

    def sync(self, **config: Any) -> WorkerStats:
        """Run a worker until the queue is empty (`pgembed worker --until-empty`)."""
        return asyncio.run(Worker(self.dsn, WorkerConfig(until_empty=True, **config)).run())

    def sync_now(self, target: str, keys: Sequence[object], *, timeout: float = 30.0) -> writethrough.SyncResult:
        """Embed these keys of a pipeline or alias now, after the application's commit, and
        return once they are searchable (`pgembed sync-now`); see pgembed.writethrough."""
        return asyncio.run(writethrough.sync_keys(self.dsn, target, keys, timeout=timeout))

    def status(self) -> list[dict[str, Any]]:
        """One row per pipeline from pgembed.pipeline_status: counts, gaps, freshness."""
        return audit.status(self.conn)

    def search(self, pipeline: str, text: str | None = None, k: int = 5, cost_center: str | None = None,
               *, vector: np.ndarray | list[float] | None = None, filter: Filter | None = None,
               attribution: Attribution | None = None) -> list[Hit]:
        """The k rows nearest to a text or a vector, one hit per row with its best chunk;
        `filter` keeps the rows whose source columns equal its values (a list: any of them);
        `attribution` labels the query's usage (source, user, task)."""
        return search(self.conn, pipeline, text, k, cost_center, vector=vector, filter=filter,
                      attribution=attribution)

    def search_with_vector(self, pipeline: str, text: str, k: int = 5, cost_center: str | None = None,
                           *, filter: Filter | None = None) -> tuple[list[Hit], np.ndarray]:
        """`search`, returning the query's vector as well (to search again without embedding)."""
        return search_with_vector(self.conn, pipeline, text, k, cost_center, filter=filter)

    def set_alias(self, alias: str, pipeline: str) -> None:
        """Point `alias` at `pipeline` (`pgembed alias set`): searches through it follow at once."""
        aliases.set_alias(self.conn, alias, pipeline)

    def drop_alias(self, alias: str) -> None:
        aliases.drop(self.conn, alias)

    def aliases(self) -> list[dict[str, Any]]:
        return aliases.list_all(self.conn)

    def evaluate(self, target: str, eval_set: str, ks: Sequence[int] = (5, 10)) -> EvalRun:
        """Run an evaluation set on an alias or a pipeline and store the run (`pgembed eval run`)."""
        return run_evaluation(self.conn, target, eval_set, ks)
