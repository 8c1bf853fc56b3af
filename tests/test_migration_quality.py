"""A model migration judged on SciFact (issue 14): an alias on hash:384 moves to the local
model, its evaluation set made of train queries; searches through the alias answer in
every phase, follow the cutover and the rollback at once; the shadow's quality is checked
against exact search over its own stored vectors in the same run. A migration to a worse
model (hash:64) is refused by the gate, with the metrics that failed, and --force passes
and is recorded. A slice of 150 documents (PGEMBED_TEST_MIGRATION_DOCS for another size;
-s prints the plan and the evaluation); `python -m benchmarks --only quality` has the full
corpus for a single pipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg import sql
from typer.testing import CliRunner

from pgembed import aliases
from pgembed import model_migrations as mm
from pgembed.cli import app
from pgembed.client import Client
from pgembed.evaluation import beir
from pgembed.evaluation.metrics import evaluate
from pgembed.evaluation.sets import EvalSet, import_set
from tests.conftest import drain

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
MINILM = "local:all-MiniLM-L6-v2"
DOCS = int(os.environ.get("PGEMBED_TEST_MIGRATION_DOCS", "150"))
TOLERANCE = 0.02  # nDCG@10 of the shadow through the alias against exact search over its vectors
PROBES = 5  # queries searched through the alias in every phase

pytestmark = pytest.mark.skipif(not SCIFACT.exists(), reason="needs the SciFact data in ../shared/data")


def cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def scifact(conn: psycopg.Connection, dsn: str) -> beir.Corpus:
    """The slice in a table, a hash:384 pipeline behind the alias `papers`, whose evaluation
    set is the slice's train queries."""
    corpus = beir.load(SCIFACT, max_docs=DOCS)
    conn.execute("CREATE TABLE papers (id text PRIMARY KEY, title text NOT NULL, body text NOT NULL)")
    with conn.cursor().copy("COPY papers (id, title, body) FROM STDIN") as copy:
        for doc, (title, body) in corpus.docs.items():
            copy.write_row((doc, title, body))
    conn.execute("SELECT pgembed.create_pipeline('papers', 'body', 'hash:384', chunk_prefix => 'title', "
                 "name => 'papers_hash')")
    drain(dsn)
    judged = EvalSet("beir", dict(corpus.queries),
                     [(q, doc, relevance) for q, docs in corpus.qrels.items() for doc, relevance in docs.items()])
    import_set(conn, "scifact-train", "papers", judged)
    aliases.set_alias(conn, "papers", "papers_hash")
    aliases.set_evaluation(conn, "papers", "scifact-train", every=None)
    return corpus


def probe(client: Client, corpus: beir.Corpus, target: str = "papers") -> list[list[str]]:
    """Searches as users make them: never an error, never an empty answer."""
    answers = []
    for text in list(corpus.queries.values())[:PROBES]:
        hits = client.search(target, text, k=10)
        assert hits, f"{target}: no result for {text!r}"
        answers.append([h.key["id"] for h in hits])
    return answers


def exact_ndcg(conn: psycopg.Connection, corpus: beir.Corpus, pipeline: str) -> float:
    """nDCG@10 of exact max-sim search over the chunks the pipeline stored, with the query
    vectors of the same model: what the alias's search must come close to."""
    from pgembed.providers.local import load_model, resolve_model

    model = load_model(resolve_model("all-MiniLM-L6-v2"))
    rows = conn.execute(sql.SQL("SELECT id, embedding::real[] FROM pgembed.{}").format(sql.Identifier(pipeline)))
    rows = rows.fetchall()
    chunks = [(doc, "") for doc, _ in rows]
    qids = list(corpus.queries)
    run = beir.max_sim_run(model.encode([corpus.queries[q] for q in qids]), qids,
                           np.array([v for _, v in rows], dtype=np.float32), chunks)
    return evaluate(corpus.qrels, run)["ndcg@10"]


@pytest.mark.local_model
@pytest.mark.timeout(900)  # the documents through the local model, then two evaluations: minutes on 2 cores
def test_hash_to_minilm_on_scifact(conn: psycopg.Connection, dsn: str, scifact: beir.Corpus) -> None:
    corpus = scifact
    with Client(dsn) as client:
        def answered_by(pipeline: str) -> list[list[str]]:
            """The alias's answers, which must be the pipeline's own (asked by its name)."""
            through_alias = probe(client, corpus)
            assert through_alias == probe(client, corpus, pipeline)
            return through_alias

        before = answered_by("papers_hash")
        planned = json.loads(cli("migrate", "plan", "papers", "--model", MINILM, "--json", "--dsn", dsn).stdout)
        assert planned["rows"] == len(corpus.docs) and planned["chunks"] >= planned["rows"]
        print(f"plan: {planned}")
        answered_by("papers_hash")

        started = cli("migrate", "start", "papers", "--model", MINILM, "--name", "papers_minilm", "--dsn", dsn)
        assert started.exit_code == 0, started.output
        answered_by("papers_hash")  # the backlog is the shadow's, the alias is untouched
        drain(dsn)
        answered_by("papers_hash")
        tokens = conn.execute("SELECT sum(tokens) FROM pgembed.usage WHERE purpose = 'migration'").fetchone()[0]
        assert tokens == pytest.approx(planned["tokens"], rel=0.02)  # the dry run, as the migration recorded

        evaluated = json.loads(cli("migrate", "evaluate", "papers", "--json", "--dsn", dsn).stdout)
        active, shadow = evaluated["active"], evaluated["shadow"]
        print(f"evaluate: active {active}; shadow {shadow}")
        assert shadow["ndcg@10"] > active["ndcg@10"] + 0.10, evaluated  # by a wide margin
        assert abs(shadow["ndcg@10"] - exact_ndcg(conn, corpus, "papers_minilm")) <= TOLERANCE
        answered_by("papers_hash")

        cut = cli("migrate", "cutover", "papers", "--dsn", dsn)
        assert cut.exit_code == 0, cut.output
        assert answered_by("papers_minilm") != before  # the new model's results, at once

        assert cli("migrate", "rollback", "papers", "--dsn", dsn).exit_code == 0
        answered_by("papers_hash")  # the old ones, at once
    spent = conn.execute("SELECT purpose, sum(tokens) FROM pgembed.cost_daily WHERE pipeline = 'papers_minilm' "
                         "GROUP BY 1").fetchall()
    assert dict(spent)["migration"] == tokens


def test_a_worse_model_is_refused_by_the_gate_and_force_is_recorded(conn: psycopg.Connection, dsn: str,
                                                                   scifact: beir.Corpus) -> None:
    corpus = scifact
    mm.start(conn, "papers", "hash:64", name="papers_h64")
    drain(dsn)
    result = mm.evaluate(conn, "papers")
    assert result.shadow["ndcg@10"] < result.active["ndcg@10"] - 0.03

    refused = cli("migrate", "cutover", "papers", "--dsn", dsn)
    assert refused.exit_code == 1 and "refused by the gate (max drop 3 points)" in refused.output
    verdict = json.loads(cli("migrate", "cutover", "papers", "--json", "--dsn", dsn).stdout)
    failed = {f["metric"] for f in verdict["failed"]}
    assert "ndcg@10" in failed and failed <= set(result.active)
    for f in verdict["failed"]:
        assert f["points"] == pytest.approx((result.active[f["metric"]] - result.shadow[f["metric"]]) * 100, abs=0.01)
        assert f["metric"] in refused.output
    assert conn.execute("SELECT pipeline FROM pgembed.aliases WHERE name = 'papers'").fetchone()[0] == "papers_hash"

    forced = cli("migrate", "cutover", "papers", "--force", "--reason", "smaller vectors, accepted", "--dsn", dsn)
    assert forced.exit_code == 0 and "cut over (forced)" in forced.output
    record = conn.execute("SELECT by_user, detail FROM pgembed.model_migration_events WHERE event = 'cut_over'")
    by_user, detail = record.fetchone()
    assert by_user == "postgres" and detail["forced"] is True and detail["reason"] == "smaller vectors, accepted"
    assert {f["metric"] for f in detail["failed"]} == failed
    with Client(dsn) as client:
        assert probe(client, corpus) == probe(client, corpus, "papers_h64")  # through the alias
