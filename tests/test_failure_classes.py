"""Every failure says what kind it is, and each kind has its retry policy
(pgembed.failure_classes): an input the provider refuses, one over the model's limit or a
content expression that raises fails again the same way, so it is parked at once; a bad
vector or a provider's bad answer is retried with backoff up to --max-attempts. A DBA
re-queues one kind once its cause is fixed; the scheduled retry only takes the kinds whose
policy says so. Each path runs the real worker against the fake OpenAI-compatible server."""

from __future__ import annotations

import dataclasses

import psycopg
import pytest
from typer.testing import CliRunner

from pgembed import pipelines
from pgembed.cli import app
from tests.conftest import drain
from tests.test_api_sync import MODEL, SMALL


def failures(conn: psycopg.Connection) -> dict[str, tuple[str, int, bool]]:
    """key -> (class, attempts, parked)"""
    return {k: (c, a, p) for k, c, a, p in conn.execute(
        "SELECT key->>0, class, attempts, parked_at IS NOT NULL FROM pgembed.failures")}


def one_table(conn: psycopg.Connection, bodies: list[str], content: str = "body", model: str = MODEL,
              options: pipelines.PipelineOptions = SMALL) -> str:
    conn.execute("CREATE TABLE t (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO t SELECT i, b FROM unnest(%s::text[]) WITH ORDINALITY AS x(b, i)", (bodies,))
    return pipelines.create(conn, "t", content, model, options)


@pytest.mark.parametrize(("error", "expected"), [
    ("content expression failed: division by zero", "content_error"),
    ("chunk 3: content expression failed: invalid input syntax for type integer", "content_error"),
    ("input has 9000 tokens, over the model's limit of 8191", "too_long"),
    ("text has 300 tokens, more than the model's limit of 256", "too_long"),  # the local provider
    ("rejected by the API (HTTP 400): This model's maximum context length is 8192 tokens", "too_long"),
    ("rejected by the API (HTTP 400): Invalid 'input': rejected", "input_rejected"),
    ("chunk 0: rejected by the API (HTTP 422): unprocessable", "input_rejected"),
    ("empty text", "input_rejected"),
    ("provider returned a vector containing NaN or Infinity", "bad_vector"),
    ("provider returned an all-zero vector (it has no direction: cosine distance is undefined)", "bad_vector"),
    ("provider returned 67 dimensions, expected 64", "bad_vector"),
    ("provider returned no vector", "provider_unavailable"),
    ("embedding API returned a body that is not a JSON embeddings response", "provider_unavailable"),
    ("rejected by the API (HTTP 400): no (a request of 8 inputs was rejected; too many rejections in this batch "
     "to isolate the bad input)", "unknown"),
    ("the API said no", "unknown"),
    ("", "unknown"),
])
def test_a_message_gets_its_class(conn, error, expected):
    assert conn.execute("SELECT pgembed.failure_class(%s)", (error,)).fetchone() == (expected,)


def test_every_class_has_a_policy_a_dba_can_read(conn):
    rows = {c: (p, a) for c, p, a in conn.execute("SELECT class, park_after, auto_retry FROM pgembed.failure_classes")}
    assert rows == {"input_rejected": (1, False), "too_long": (1, False), "content_error": (1, False),
                    "bad_vector": (None, True), "provider_unavailable": (None, True), "unknown": (None, True)}


def test_a_rejected_input_is_parked_at_once(conn, dsn, fake_api):
    one_table(conn, ["fine", "poison pill"])
    fake_api.always_reject("poison")
    drain(dsn, max_attempts=5)
    assert failures(conn) == {"2": ("input_rejected", 1, True)}


def test_an_input_over_the_models_limit_is_parked_at_once(conn, dsn, fake_api):
    conn.execute("INSERT INTO pgembed.models (model, dimensions, shortenable, max_input_tokens, short_name) "
                 "VALUES ('openai:tiny', 1536, true, 5, 'tiny')")
    one_table(conn, ["short", "a text of many more words than the tiny model takes"], model="openai:tiny",
              options=dataclasses.replace(SMALL, chunking="none"))  # chunked, it would fit
    drain(dsn, max_attempts=5)
    assert failures(conn) == {"2": ("too_long", 1, True)}
    assert fake_api.inputs == 1, "never sent"


def test_an_input_the_api_calls_too_long_is_too_long(conn, dsn, fake_api):
    one_table(conn, ["fine", "enormous text"])
    fake_api.always_reject("enormous", message="This model's maximum context length is 8192 tokens, "
                                               "however you requested 9000 tokens")
    drain(dsn, max_attempts=5)
    assert failures(conn) == {"2": ("too_long", 1, True)}


def test_a_content_expression_that_raises_is_parked_at_once(conn, dsn, fake_api):
    one_table(conn, ["ok", ""], content="body || (1 / length(body))::text")
    drain(dsn, max_attempts=5)
    assert failures(conn) == {"2": ("content_error", 1, True)}


@pytest.mark.parametrize(("garbage", "expected"), [("nan", "bad_vector"), ("zero", "bad_vector"),
                                                   ("not_json", "provider_unavailable"),
                                                   ("wrong_count", "provider_unavailable")])
def test_a_bad_answer_is_retried_up_to_max_attempts_then_parked(conn, dsn, fake_api, garbage, expected):
    one_table(conn, ["the only row"])
    fake_api.garbage(garbage, 3)
    drain(dsn, max_attempts=3)  # retry_base 0: each failure is retried at once
    assert failures(conn) == {"1": (expected, 3, True)}
    assert fake_api.requests == 3


def test_a_bad_answer_once_is_retried_and_lands(conn, dsn, fake_api):
    one_table(conn, ["the only row"])
    fake_api.garbage("nan", 1)
    drain(dsn, max_attempts=3)
    assert failures(conn) == {}
    assert conn.execute("SELECT count(*) FROM pgembed.t_te3s_64").fetchone() == (1,)


def test_a_dba_changes_a_policy_and_the_worker_follows_it(conn, dsn, fake_api):
    conn.execute("UPDATE pgembed.failure_classes SET park_after = 3 WHERE class = 'content_error'")
    one_table(conn, ["ok", ""], content="body || (1 / length(body))::text")
    drain(dsn, max_attempts=5)
    assert failures(conn) == {"2": ("content_error", 3, True)}
    conn.execute("UPDATE pgembed.failure_classes SET park_after = NULL WHERE class = 'content_error'")
    conn.execute("SELECT pgembed.retry_failures()")
    drain(dsn, max_attempts=2)
    assert failures(conn) == {"2": ("content_error", 2, True)}


def _parked_of_every_kind(conn: psycopg.Connection, dsn: str, fake_api) -> None:
    """Row 2 a content error, row 3 rejected, row 4 a NaN three times: all parked."""
    one_table(conn, ["ok", "", "poison"], content="body || (1 / length(body))::text")
    fake_api.always_reject("poison")
    drain(dsn, max_attempts=3)
    fake_api.always_reject(None)
    fake_api.garbage("nan", 3)
    conn.execute("INSERT INTO t VALUES (4, 'nan here')")
    drain(dsn, max_attempts=3)
    assert failures(conn) == {"2": ("content_error", 1, True), "3": ("input_rejected", 1, True),
                              "4": ("bad_vector", 3, True)}


def test_retry_failures_requeues_one_class_through_the_one_rule(conn, dsn, fake_api):
    _parked_of_every_kind(conn, dsn, fake_api)
    assert conn.execute("SELECT pgembed.retry_failures(class => 'input_rejected')").fetchone() == (1,)
    assert conn.execute("SELECT key->>0, purpose, attempts FROM pgembed.outbox").fetchall() == [("3", "retry", 0)]
    drain(dsn, max_attempts=3)
    assert failures(conn) == {"2": ("content_error", 1, True), "4": ("bad_vector", 3, True)}
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="no failure class nope; the classes are "):
        conn.execute("SELECT pgembed.retry_failures(class => 'nope')")


def test_the_scheduled_retry_takes_only_the_classes_whose_policy_says_so(conn, dsn, fake_api):
    _parked_of_every_kind(conn, dsn, fake_api)
    conn.execute("UPDATE pgembed.failures SET parked_at = parked_at - interval '2 hours', "
                 "first_failed_at = first_failed_at - interval '2 hours'")
    assert conn.execute("SELECT pgembed.retry_parked_failures('1 hour')").fetchone() == (1,)
    assert conn.execute("SELECT key->>0 FROM pgembed.outbox").fetchall() == [("4",)]


def test_the_views_show_failures_by_class(conn, dsn, fake_api):
    _parked_of_every_kind(conn, dsn, fake_api)
    status = conn.execute("SELECT failed, failed_by_class FROM pgembed.pipeline_status").fetchone()
    assert status == (3, {"bad_vector": 1, "content_error": 1, "input_rejected": 1})
    counts = conn.execute("SELECT class, parked, retrying, park_after, auto_retry FROM pgembed.failure_counts "
                          "ORDER BY class").fetchall()
    assert counts == [("bad_vector", 1, 0, None, True), ("content_error", 1, 0, 1, False),
                      ("input_rejected", 1, 0, 1, False)]


def test_status_check_says_which_classes_are_parked(conn, dsn, fake_api):
    _parked_of_every_kind(conn, dsn, fake_api)
    result = CliRunner().invoke(app, ["status", "--check", "--dsn", dsn])
    assert result.exit_code == 1
    assert ("3 rows failed and are parked (bad_vector 1, content_error 1, input_rejected 1; "
            "pgembed failures)") in " ".join(result.output.split()), result.output


def test_a_class_a_dba_deleted_from_the_policy_counts_as_unknown(conn, dsn, fake_api):
    conn.execute("DELETE FROM pgembed.failure_classes WHERE class = 'input_rejected'")
    one_table(conn, ["fine", "poison pill"])
    fake_api.always_reject("poison")
    drain(dsn, max_attempts=2)
    assert failures(conn) == {"2": ("unknown", 2, True)}, "recorded, retried as unknown, never lost"
