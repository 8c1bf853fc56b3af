"""Every query embedding is recorded under the caller's labels (source, user, task), and a
label the ledger cannot take is refused before anything is spent."""

from __future__ import annotations

import pytest

from pgembed.attribution import Attribution, AttributionError, from_headers
from pgembed.search import search
from tests.test_costs import tenant_table


def test_labels_come_from_the_headers_and_the_user_field_fills_in():
    a = from_headers({"X-Pgembed-Source": "user_query", "x-pgembed-task": "ask"}, body_user="u-7")
    assert a == Attribution(source="user_query", user="u-7", task="ask", purpose="query")
    b = from_headers({"X-PGEMBED-USER": "header-wins", "X-Pgembed-Purpose": "index"}, body_user="u-7")
    assert (b.user, b.purpose) == ("header-wins", "index")
    assert from_headers({}) == Attribution()


@pytest.mark.parametrize("headers, body_user, says", [
    ({"X-Pgembed-Purpose": "backfill"}, None, "purpose must be one of"),
    ({"X-Pgembed-Task": "x" * 201}, None, "1 to 200 characters"),
    ({"X-Pgembed-Source": "a\x1b[2Jb"}, None, "control characters"),
    ({}, ["not", "a", "string"], "user must be a string"),
])
def test_a_label_the_ledger_cannot_take_is_refused(headers, body_user, says):
    with pytest.raises(AttributionError, match=says):
        from_headers(headers, body_user)


def test_a_search_records_its_labels_and_a_bad_label_spends_nothing(conn, dsn, fake_api):
    from tests.conftest import drain

    name = tenant_table(conn, [(1, "acme", "stars at night"), (2, "acme", "bread and butter")])
    drain(dsn)
    before = fake_api.requests
    search(conn, name, "what shines at night", 1,
           attribution=Attribution(source="user_query", user="ana", task="find 'notes' $body$"))
    row = conn.execute("SELECT purpose, source, app_user, task, cache_misses FROM pgembed.usage "
                       "WHERE purpose = 'query'").fetchone()
    assert row == ("query", "user_query", "ana", "find 'notes' $body$", 1)
    assert fake_api.requests == before + 1
    with pytest.raises(AttributionError):
        search(conn, name, "another question", 1, attribution=Attribution(user="\n"))
    assert fake_api.requests == before + 1
