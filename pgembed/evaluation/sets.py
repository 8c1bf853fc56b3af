"""Evaluation sets from files: BEIR's (queries JSONL + qrels TSV) and pgembed's JSONL, one
query a line: {"query": text, "relevant": [keys], "irrelevant": [keys], "id": optional}.

A key is a row's primary key in the set's source table: the bare value for a one-column key
(42 or "42"), else an object of the key columns. Reading checks the files' shape (every
field, no duplicate id, no row judged twice, a relevant row for every query) and says where
it is wrong; pgembed.import_eval_set then checks every key against the table and writes the
whole set, or nothing.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pgembed.pipelines import PipelineError, refused
from pgembed.sqlfiles import query

JSONL_FIELDS = {"query", "relevant", "irrelevant", "id"}


class EvalSetError(ValueError):
    """A file that cannot be an evaluation set; the message says where and why."""


@dataclass
class EvalSet:
    origin: str  # "beir" or "jsonl"
    queries: dict[str, str] = field(default_factory=dict)  # id -> text
    judgments: list[tuple[str, Any, int]] = field(default_factory=list)  # (query id, key, relevance)


def _lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise EvalSetError(f"{path}:{number}: not JSON ({error.msg})") from None
                if not isinstance(value, dict):
                    raise EvalSetError(f"{path}:{number}: a line must be a JSON object")
                yield number, value
    except OSError as error:
        raise EvalSetError(f"cannot read {path}: {error.strerror}") from None


def _text(path: Path, number: int, value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise EvalSetError(f"{path}:{number}: {name} must be a non-empty string")
    return value


def _judge(found: EvalSet, where: str, query_id: str, key: Any, relevance: int, seen: set[tuple[str, str]]) -> None:
    if isinstance(key, bool) or not isinstance(key, str | int | dict) or key in ("", {}):
        raise EvalSetError(f"{where}: {json.dumps(key)} is not a key (a value, or an object of key columns)")
    marker = json.dumps(key, sort_keys=True)
    if (query_id, marker) in seen:
        raise EvalSetError(f"{where}: query {query_id!r} judges key {marker} twice")
    seen.add((query_id, marker))
    found.judgments.append((query_id, key, relevance))


def read_jsonl(path: Path) -> EvalSet:
    found = EvalSet("jsonl")
    seen: set[tuple[str, str]] = set()
    for number, line in _lines(path):
        unknown = sorted(set(line) - JSONL_FIELDS)
        if unknown:
            raise EvalSetError(f"{path}:{number}: unknown field(s) {', '.join(unknown)} "
                               f"(a line has query, relevant, irrelevant and optionally id)")
        for needed in ("query", "relevant"):
            if needed not in line:
                raise EvalSetError(f"{path}:{number}: missing field {needed!r}")
        query_id = str(line.get("id", number))
        if isinstance(line.get("id"), bool) or not isinstance(line.get("id", ""), str | int):
            raise EvalSetError(f"{path}:{number}: id must be a string or an integer")
        if query_id in found.queries:
            raise EvalSetError(f"{path}:{number}: duplicate query id {query_id!r}")
        found.queries[query_id] = _text(path, number, line["query"], "query")
        for name, relevance in (("relevant", 1), ("irrelevant", 0)):
            keys = line.get(name, [])
            if not isinstance(keys, list):
                raise EvalSetError(f"{path}:{number}: {name} must be a list of keys")
            for key in keys:
                _judge(found, f"{path}:{number}", query_id, key, relevance, seen)
        if not line["relevant"]:
            raise EvalSetError(f"{path}:{number}: query {query_id!r} has no relevant key")
    if not found.queries:
        raise EvalSetError(f"{path}: no queries")
    return found


def read_beir(queries_path: Path, qrels_path: Path) -> EvalSet:
    """The queries the qrels judge (a BEIR queries file holds every split's), with their
    judgments: a score of 0 is a row judged irrelevant."""
    texts: dict[str, str] = {}
    for number, line in _lines(queries_path):
        for needed in ("_id", "text"):
            if needed not in line:
                raise EvalSetError(f"{queries_path}:{number}: missing field {needed!r}")
        query_id = str(line["_id"])
        if query_id in texts:
            raise EvalSetError(f"{queries_path}:{number}: duplicate query id {query_id!r}")
        texts[query_id] = _text(queries_path, number, line["text"], "text")
    found = EvalSet("beir")
    seen: set[tuple[str, str]] = set()
    try:
        with open(qrels_path, newline="", encoding="utf-8") as f:
            rows = csv.DictReader(f, delimiter="\t")
            missing = {"query-id", "corpus-id", "score"} - set(rows.fieldnames or ())
            if missing:
                raise EvalSetError(f"{qrels_path}:1: missing column(s) {', '.join(sorted(missing))} "
                                   "(a BEIR qrels file starts with query-id, corpus-id, score)")
            for number, row in enumerate(rows, 2):
                where = f"{qrels_path}:{number}"
                query_id, key, score = row["query-id"], row["corpus-id"], row["score"]
                if query_id not in texts:
                    raise EvalSetError(f"{where}: query {query_id!r} is not in {queries_path}")
                if not (score or "").strip().isdigit():
                    raise EvalSetError(f"{where}: score must be a whole number 0 or more, not {score!r}")
                found.queries.setdefault(query_id, texts[query_id])
                _judge(found, where, query_id, key, int(score), seen)
    except OSError as error:
        raise EvalSetError(f"cannot read {qrels_path}: {error.strerror}") from None
    judged = {q for q, _, relevance in found.judgments if relevance > 0}
    lacking = sorted(set(found.queries) - judged)
    if lacking:
        raise EvalSetError(f"{qrels_path}: query {lacking[0]!r} has no relevant row (score above 0)")
    if not found.queries:
        raise EvalSetError(f"{qrels_path}: no judgments")
    return found


def import_set(conn: psycopg.Connection, name: str, source: str, found: EvalSet, *, replace: bool = False) -> int:
    """Writes the set (or nothing: every key must name a row of `source`); its query count."""
    params = {
        "name": name, "source": source, "origin": found.origin, "replace": replace,
        "queries": Jsonb([{"id": q, "query": text} for q, text in found.queries.items()]),
        "judgments": Jsonb([{"query_id": q, "key": key, "relevance": relevance}
                            for q, key, relevance in found.judgments]),
    }
    try:
        with conn.transaction():
            row = conn.execute(query("eval_import"), params).fetchone()
    except psycopg.Error as error:
        raise refused(error) from error
    assert row is not None
    return int(row[0])


def list_sets(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return conn.cursor(row_factory=dict_row).execute(query("eval_set_list")).fetchall()


def drop_set(conn: psycopg.Connection, name: str) -> None:
    """Drops a set, its runs with it (an alias that re-ran it forgets it)."""
    with conn.transaction():
        if conn.execute(query("eval_drop"), {"name": name}).fetchone() is None:
            raise PipelineError(f"no evaluation set named {name!r} (pgembed eval sets lists them)")
