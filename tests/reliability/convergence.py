"""The one convergence check every reliability scenario ends with.

For every pipeline: the destination holds exactly the chunks of each live row's current
content, each with the vector the model gives for that chunk; no rows of deleted keys; no
duplicate (key, chunk_seq); rows whose content cannot be embedded are parked in
pgembed.failures and nowhere else; the outbox is empty; pgembed.consistency_gaps (when it
exists) reports nothing but those parked failures; and the fake API received no more
inputs than the scenario's stated bound over the ideal.

What "current content" is comes from the test, not from pgembed: the scenario reads the
raw columns with its own query and gives a Python mirror of the content expression, and
the chunks are cut here with the chunker's public function. Nothing here calls pgembed's
SQL functions or views, except the gap view, which is checked, not trusted.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from pgembed.chunking import chunk_text
from pgembed.providers.hashing import hash_vector
from pgembed.tokens import count_tokens

Key = tuple[Any, ...]


def _norm(value: Any) -> Any:
    return tuple(_norm(v) for v in value) if isinstance(value, list | tuple) else value


@dataclass
class Expect:
    """One pipeline and how the test computes what its destination must hold.

    `content(*columns)` mirrors the pipeline's SQL expression over the raw `columns`; it
    returns None for SQL NULL and may raise (as the SQL would) for rows that must fail.
    `rejected(text)` names texts the API refuses; `max_input_tokens` makes texts over the
    model's limit expected failures (unchunked pipelines of API models).
    """

    pipeline: str
    table: str
    key_columns: Sequence[str]
    columns: Sequence[str]
    content: Callable[..., str | None]
    chunk_tokens: int = 0
    overlap: int = 0
    rejected: Callable[[str], bool] = lambda text: False
    max_input_tokens: int | None = None

    def chunks(self, text: str) -> list[str]:
        return chunk_text(text, self.chunk_tokens, self.overlap) if self.chunk_tokens else (
            [text] if text.strip(" \t\n\r\f\v") else [])


@dataclass
class Report:
    pipelines: int = 0
    rows: int = 0
    chunks: int = 0
    expected_failures: int = 0
    lost: int = 0            # live rows without exactly their current chunks (or parked though good)
    wrong_vectors: int = 0
    duplicates: int = 0      # (key, chunk_seq) stored more than once
    orphans: int = 0         # vectors of keys that are not live rows
    gaps: int = 0
    outbox: int = 0
    seconds: float = 0.0     # from the call until the outbox was empty
    api_inputs: int | None = None
    api_ideal: int | None = None
    api_bound: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _wait_for_empty_outbox(conn: psycopg.Connection, timeout: float) -> float:
    start = time.monotonic()
    while True:
        left = conn.execute("SELECT count(*) + pgembed.statement_keys() FROM pgembed.outbox").fetchone()[0]
        if left == 0:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            leased = conn.execute("SELECT count(*) FROM pgembed.outbox WHERE lease_id IS NOT NULL").fetchone()[0]
            raise AssertionError(f"not converged after {timeout:.0f}s: {left} rows still queued "
                                 f"({leased} leased)")
        time.sleep(0.1)


def _expected(conn: psycopg.Connection, e: Expect) -> tuple[dict[Key, list[str]], dict[Key, str], dict[str, Key]]:
    """{key: chunks} of rows that must land, {key: why} of rows that must fail, and
    {failures.key as text: key} to match pgembed.failures rows."""
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in e.key_columns)
    query = sql.SQL("SELECT jsonb_build_array({})::text, {}, {} FROM {}").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in e.key_columns),
        keys, sql.SQL(", ").join(sql.Identifier(c) for c in e.columns), sql.SQL(e.table))
    land: dict[Key, list[str]] = {}
    fail: dict[Key, str] = {}
    json_keys: dict[str, Key] = {}
    n = len(e.key_columns)
    for row in conn.execute(query):
        key = _norm(tuple(row[1:1 + n]))
        json_keys[row[0]] = key
        try:
            text = e.content(*row[1 + n:])
        except (ArithmeticError, ValueError) as error:
            fail[key] = f"content expression raises {type(error).__name__}"
            continue
        chunks = e.chunks(text) if text is not None else []
        if not chunks:
            land[key] = []  # nothing to embed: no vectors, and no failure either
        elif any(e.rejected(c) for c in chunks):
            fail[key] = "rejected by the API"
        elif e.max_input_tokens and any(count_tokens(c) > e.max_input_tokens for c in chunks):
            fail[key] = "over the model's input limit"
        else:
            land[key] = chunks
    return land, fail, json_keys


def converge(conn: psycopg.Connection, expects: Sequence[Expect], *, api: Any = None,
             bound: Callable[[int], int] | None = None, timeout: float = 120.0,
             vector_sample: int | None = None, check: bool = True) -> Report:
    """Waits for the outbox to empty, then checks every invariant; raises AssertionError
    listing every problem unless `check` is False. The report has the figures either way.

    `bound(ideal)` is the most API inputs the scenario allows, where `ideal` is the number
    of distinct texts the final state needs from API models.
    """
    report = Report(pipelines=len(expects))
    report.seconds = _wait_for_empty_outbox(conn, timeout)
    api_texts: set[str] = set()
    for e in expects:
        _check_pipeline(conn, e, report, api_texts, vector_sample)
    report.outbox = conn.execute("SELECT count(*) + pgembed.statement_keys() FROM pgembed.outbox").fetchone()[0]
    if report.outbox:
        report.problems.append(f"outbox holds {report.outbox} rows")
    if api is not None:
        report.api_inputs = api.inputs
        report.api_ideal = len(api_texts)
        if bound is not None:
            report.api_bound = bound(report.api_ideal)
            if report.api_inputs > report.api_bound:
                report.problems.append(f"the API received {report.api_inputs} inputs, over the bound "
                                       f"{report.api_bound} (ideal {report.api_ideal})")
    if check:
        assert report.ok, "not converged:\n  " + "\n  ".join(report.problems[:40])
    return report


def _check_pipeline(conn: psycopg.Connection, e: Expect, report: Report, api_texts: set[str],
                    vector_sample: int | None) -> None:
    model, dims = conn.execute("SELECT model, dimensions FROM pgembed.pipelines WHERE name = %s",
                               (e.pipeline,)).fetchone()
    land, fail, json_keys = _expected(conn, e)
    report.rows += len(land)
    report.expected_failures += len(fail)
    if model.startswith("openai:"):
        api_texts.update(c for chunks in land.values() for c in chunks)

    stored: dict[Key, list[tuple[int, str, Any]]] = {}
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in e.key_columns)
    dest = sql.SQL("pgembed.{}").format(sql.Identifier(e.pipeline))
    for row in conn.execute(sql.SQL("SELECT {}, chunk_seq, chunk, embedding FROM {}").format(keys, dest)):
        key = _norm(tuple(row[:len(e.key_columns)]))
        stored.setdefault(key, []).append(tuple(row[len(e.key_columns):]))
    report.duplicates += conn.execute(sql.SQL(
        "SELECT count(*) - count(DISTINCT ({}, chunk_seq)) FROM {}").format(keys, dest)).fetchone()[0]

    where = f"{e.pipeline}:"
    orphans = [k for k in stored if k not in land and k not in fail]
    report.orphans += len(orphans)
    if orphans:
        report.problems.append(f"{where} {len(orphans)} keys have vectors but no live row, e.g. {orphans[:3]}")
    vectors_to_check: list[tuple[str, Any]] = []
    for key, chunks in land.items():
        rows = sorted(stored.get(key, []), key=lambda r: r[0])
        if [r[1] for r in rows] != chunks or [r[0] for r in rows] != list(range(len(chunks))):
            report.lost += 1
            if report.lost <= 5:
                got = [r[1][:60] for r in rows]
                report.problems.append(f"{where} key {key} holds {got} instead of {[c[:60] for c in chunks]}")
            continue
        report.chunks += len(rows)
        vectors_to_check.extend((r[1], r[2]) for r in rows)
    for key in fail:
        if key in stored:
            report.lost += 1
            report.problems.append(f"{where} key {key} must fail ({fail[key]}) but has vectors")
    if vector_sample is not None and len(vectors_to_check) > vector_sample:
        vectors_to_check = random.Random(1).sample(vectors_to_check, vector_sample)
    for text, vector in vectors_to_check:
        values = vector.to_numpy()
        if not np.all(np.isfinite(values)) or not np.allclose(values, hash_vector(text, dims), atol=1e-5):
            report.wrong_vectors += 1
            if report.wrong_vectors <= 3:
                report.problems.append(f"{where} the vector of {text[:40]!r} is not the model's")

    parked = {}
    for jkey, error, parked_at in conn.execute(
            "SELECT key::text, error, parked_at FROM pgembed.failures WHERE pipeline = %s", (e.pipeline,)):
        parked[json_keys.get(jkey, ("<not a live row>", jkey))] = (error, parked_at)
    for key, why in fail.items():
        if key not in parked or parked[key][1] is None:
            report.problems.append(f"{where} key {key} ({why}) is not parked in pgembed.failures")
    for key, (error, _) in parked.items():
        if key not in fail:
            report.lost += key in land
            report.problems.append(f"{where} key {key} has a failure it should not have: {error[:120]}")

    if conn.execute("SELECT to_regclass('pgembed.consistency_gaps')").fetchone()[0] is not None:
        gaps = conn.execute("SELECT kind, key::text FROM pgembed.consistency_gaps WHERE pipeline = %s",
                            (e.pipeline,)).fetchall()
        unexpected = [(kind, k) for kind, k in gaps
                      if not (kind == "failed" and json_keys.get(k) in fail)]
        report.gaps += len(unexpected)
        if unexpected:
            report.problems.append(f"{where} consistency_gaps reports {unexpected[:5]}")


def duplicate_inputs(received: Sequence[str]) -> int:
    """Texts the API was sent more than once."""
    return len(received) - len(set(received))


def ceil_log2(n: int) -> int:
    return max(1, math.ceil(math.log2(max(n, 2))))
