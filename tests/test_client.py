"""`pgembed.Client`: the Python verbs, end to end on a database without the schema."""

from __future__ import annotations

import pgembed


def test_client_verbs(empty_dsn):
    with pgembed.Client(empty_dsn) as client:
        client.init()
        client.conn.execute("CREATE TABLE faq (id int PRIMARY KEY, q text, a text)")
        client.conn.execute("INSERT INTO faq VALUES (1, 'opening hours', 'nine to five'), "
                            "(2, 'parking', 'behind the building')")
        name = client.create_pipeline("faq", "q || ': ' || a", "hash:128", chunk_tokens=0)
        assert [p["name"] for p in client.pipelines()] == [name]
        stats = client.sync()
        assert stats.written == 2
        hits = client.search(name, "where is parking", k=1)
        assert hits[0].key == {"id": 2} and hits[0].chunk == "parking: behind the building"
        (status,) = client.status()
        assert (status["pipeline"], status["embedded_rows"], status["queued"]) == (name, 2, 0)
        client.drop_pipeline(name)
        assert client.pipelines() == []
