"""POST /v1/sync: the gateway's write-through. Named rows are searchable when it answers
200; with the API down it answers 202, the rows stay queued and a worker converges them;
bad input is a 400 that takes nothing."""

from __future__ import annotations

import httpx2 as httpx
import pytest

from tests.conftest import drain
from tests.gateway_server import TOKEN, gateway
from tests.reliability.convergence import converge
from tests.reliability.harness import api_pipeline, body_expect, make_docs
from tests.test_write_through import outbox, stored

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_synced_rows_are_searchable_when_it_answers(conn, dsn, fake_api):
    make_docs(conn, "docs", 3)
    name = api_pipeline(conn, "docs")
    drain(dsn)
    conn.execute("SELECT pgembed.set_alias('docs_search', %s)", (name,))
    conn.execute("INSERT INTO docs VALUES (10, 'a note about ''quotes'', $body$ and a\nnewline')")
    with gateway(dsn) as url:
        answer = httpx.post(f"{url}/sync", headers=AUTH, json={"target": "docs_search", "keys": [10]})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["ok"] and body["pipeline"] == name and [k["status"] for k in body["keys"]] == ["stored"]
        found = httpx.post(f"{url}/search", headers=AUTH, json={
            "target": "docs_search", "query": "a note about 'quotes', $body$ and a\nnewline", "k": 1})
        assert found.json()["data"][0]["key"] == {"id": 10}
        again = httpx.post(f"{url}/sync", headers=AUTH, json={"target": name, "keys": [10]})
        assert [k["status"] for k in again.json()["keys"]] == ["fresh"]
    assert "10" in stored(conn, name)


def test_with_the_api_down_it_answers_202_and_the_worker_converges_the_rows(conn, dsn, fake_api):
    make_docs(conn, "docs", 2)
    name = api_pipeline(conn, "docs")
    drain(dsn)
    conn.execute("INSERT INTO docs VALUES (10, 'written during the outage')")
    fake_api.fail_next(10**6, status=500)
    with gateway(dsn) as url:
        answer = httpx.post(f"{url}/sync", headers=AUTH, json={"target": name, "keys": [10], "timeout": 20})
    assert answer.status_code == 202, answer.text
    assert [k["status"] for k in answer.json()["keys"]] == ["failed"]
    assert outbox(conn) == [("10", True, True)]  # back in line, leased to nobody
    fake_api.fail_next(0)
    drain(dsn)
    converge(conn, [body_expect(name, "docs")])


@pytest.mark.parametrize("body, status, words", [
    ({"keys": [1]}, 400, "'target'"),
    ({"target": "docs_x", "keys": []}, 400, "'keys'"),
    ({"target": "docs_x", "keys": "1"}, 400, "'keys'"),
    ({"target": "docs_x", "keys": [1], "timeout": 0}, 400, "'timeout'"),
    ({"target": "docs_x", "keys": [1], "timeout": "soon"}, 400, "'timeout'"),
    ({"target": "nowhere", "keys": [1]}, 400, "nowhere"),
    ({"target": "docs_x", "keys": [[1, 2]]}, 400, "key"),
])
def test_bad_input_is_a_400_and_takes_nothing(conn, dsn, body, status, words):
    make_docs(conn, "docs", 1)
    conn.execute("SELECT pgembed.create_pipeline('docs', 'body', 'hash:8', name => 'docs_x')")
    with gateway(dsn) as url:
        refused = httpx.post(f"{url}/sync", headers=AUTH, json=body)
        assert refused.status_code == status and words in refused.json()["error"]["message"], refused.text
        assert httpx.post(f"{url}/sync", json={"target": "docs_x", "keys": [1]}).status_code == 401
    assert outbox(conn) == [("1", True, True)]
