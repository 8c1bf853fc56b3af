"""5. Bad input: NULL, empty and whitespace-only content, megabytes of text, invalid UTF-8,
emoji, right-to-left and combining characters, a content expression that raises for some
rows. Good rows land; each bad row is parked with a message naming its cause. One input the
API always rejects costs at most 1 + 2·log2(64) extra requests to isolate in a batch of 64."""

from __future__ import annotations

import random
import time

import psycopg
import pytest

from tests.reliability.convergence import Expect, converge
from tests.reliability.harness import FORMS, api_pipeline, scalar

NASTY = [
    "emoji 😀🚀 family 👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "right to left: שלום עולם — مرحبا بالعالم",
    "override \u202egnirts desrever\u202c end",
    "combining: e\u0301 a\u0308 Z\u0351\u0352\u0353 q\u0307\u0323",
    "zero width\u200b\u200c\u200d joiners and a BOM \ufeff inside",
    "looks special: <|endoftext|> <|im_start|> {{ '%s' }} $1 \\x00",
    "CJK 漢字かなカナ한국어 and math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ E⋅da = Q",
    "\u200d",  # nothing a human can see, but not whitespace: it is embedded
    "x",
]
BAD = [None, "", "   ", "\t\n \r\n"]


def big_text(size: int) -> str:
    rng = random.Random(5)
    words = ["alpha", "beta", "gamma", "délta", "épsilon", "ζήτα", "eta", "θήτα", "iota", "kappa", "😀"]
    out, total = [], 0
    while total < size:
        w = rng.choice(words) + str(rng.randrange(1000))
        out.append(w)
        total += len(w.encode()) + 1
    return " ".join(out)


def divide(body: str | None, id_: int) -> str | None:
    """Python mirror of `body || (1/(id % 7))::text`: integer division, NULL-strict."""
    quotient = int(1 / (id_ % 7))
    return None if body is None else body + str(quotient)


@pytest.mark.parametrize("form", FORMS)
def test_bad_input_fails_alone_with_its_cause(form, db, api, fleet, results):
    started = time.monotonic()
    # A: one always-rejected input inside a batch of 64
    db.execute("CREATE TABLE batch64 (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO batch64 SELECT g, 'fine text number ' || g FROM generate_series(1, 64) g")
    db.execute("UPDATE batch64 SET body = 'a POISON pill' WHERE id = 23")
    poison = api_pipeline(db, "batch64")
    api.always_reject("POISON")
    fleet.start(until_empty=True, batch_size=64, concurrency=1, max_attempts=1).wait(120)
    isolate = api.requests - 1
    isolate_inputs = api.inputs - 64
    assert isolate <= 1 + 2 * 6, f"isolating one rejected input of 64 took {isolate} extra requests"
    (error,) = db.execute("SELECT error FROM pgembed.failures WHERE pipeline = %s", (poison,)).fetchone()
    assert "rejected by the API" in error and "HTTP 400" in error

    # B: every kind of bad content, in three pipelines over one table
    big = form.pick(1, 5) * 1024 * 1024
    db.execute("CREATE TABLE notes (id int PRIMARY KEY, body text, raw bytea)")
    text = big_text(big)
    values = [*BAD, *NASTY] * form.pick(1, 20) + [text] * form.pick(1, 2)
    values += [f"plain row {i}" for i in range(form.pick(40, 2000))]
    with db.cursor() as cur:
        cur.executemany("INSERT INTO notes VALUES (%s, %s, convert_to(%s, 'UTF8'))",
                        [(i + 1, v, v) for i, v in enumerate(values)])
    # invalid UTF-8 never gets into a text column: PostgreSQL refuses it, nothing is queued
    with pytest.raises(psycopg.errors.CharacterNotInRepertoire):
        db.execute("INSERT INTO notes (id, body) VALUES (-1, convert_from('\\xff41'::bytea, 'UTF8'))")
    # ...but it can sit in a bytea that the content expression decodes: those rows fail
    bad_bytes = [10_000 + i for i in range(3)]
    db.execute("INSERT INTO notes SELECT g, 'some body', '\\xc328ff'::bytea FROM unnest(%s::int[]) g",
               (bad_bytes,))
    # plain, divided and decoded are unchunked ('none'): a text over the model's limit fails
    plain = api_pipeline(db, "notes", "body", chunking="none")
    chunked = api_pipeline(db, "notes", "body", chunk_tokens=200, chunk_overlap=20, name="notes_chunked")
    divided = api_pipeline(db, "notes", "body || (1/(id % 7))::text", name="notes_divided", chunking="none")
    decoded = api_pipeline(db, "notes", "convert_from(raw, 'UTF8')", name="notes_decoded", chunking="none")
    api.always_reject(None)
    fleet.start(batch_size=64, concurrency=2, max_attempts=1, lease=120)

    def decode(raw: bytes | None) -> str | None:
        return None if raw is None else bytes(raw).decode("utf-8")  # raises ValueError like SQL

    expects = [
        Expect(poison, "batch64", ["id"], ["body"], lambda b: b, rejected=lambda text: "POISON" in text),
        Expect(plain, "notes", ["id"], ["body"], lambda b: b, max_input_tokens=8191),
        Expect(chunked, "notes", ["id"], ["body"], lambda b: b, chunk_tokens=200, overlap=20),
        Expect(divided, "notes", ["id"], ["body", "id"], divide, max_input_tokens=8191),
        Expect(decoded, "notes", ["id"], ["raw"], decode, max_input_tokens=8191),
    ]
    report = converge(db, expects, api=api, timeout=form.pick(120, 600),
                      # two pipelines may miss the cache on one text at the same moment
                      bound=lambda ideal: ideal + 1 + isolate_inputs + 2 * len(values))
    why = {(p, k): e for p, k, e in db.execute("SELECT pipeline, key->>0, error FROM pgembed.failures")}
    big_ids = [str(i + 1) for i, v in enumerate(values) if v and len(v) > 100_000]
    for i, v in enumerate(values):
        key = str(i + 1)
        if v is None or not v.strip(" \t\n\r\f\v"):  # nothing to embed: neither a failure nor a gap
            assert (plain, key) not in why, why[(plain, key)]
    for key in big_ids:
        assert "over the model's limit" in why[(plain, key)], why[(plain, key)]
        assert (chunked, key) not in why, "chunked, the big text lands"
    for i in range(len(values)):
        if (i + 1) % 7 == 0:
            assert "division by zero" in why[(divided, str(i + 1))]
    for key in bad_bytes:
        assert "invalid byte sequence" in why[(decoded, str(key))]
    assert all(k[0] in (plain, chunked, divided, decoded, poison) for k in why)
    assert why[(poison, "23")] == error
    results.add("5 bad input", form.name,
                load=f"{len(values) + len(bad_bytes)} rows × 4 pipelines (plain, chunked, raising, decoding); "
                     f"64-row batch with a rejected input",
                faults="API rejects one input (HTTP 400)",
                inputs=f"NULL, '', whitespace, {big // 2**20} MB text, invalid UTF-8, emoji, RTL, combining, "
                       "zero-width, special-token look-alikes, 1/(id % 7)",
                report=report, isolate_extra_requests=isolate, isolate_bound=13,
                parked=scalar(db, "SELECT count(*) FROM pgembed.failures"),
                total_s=round(time.monotonic() - started, 1))


def test_a_function_dropped_from_under_the_content_fails_rows_and_keeps_vectors(db, fleet):
    db.execute("CREATE FUNCTION public.tidy(text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT trim($1) $$")
    db.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    db.execute("INSERT INTO notes SELECT g, ' note ' || g FROM generate_series(1, 20) g")
    from pgembed import pipelines

    name = pipelines.create(db, "notes", "public.tidy(body)", "hash:8")
    fleet.start(until_empty=True, max_attempts=1).wait(60)
    assert scalar(db, f"SELECT count(*) FROM pgembed.{name}") == 20
    # the pipeline's binding view depends on the function: a plain DROP is refused...
    with pytest.raises(psycopg.errors.DependentObjectsStillExist, match=r"pgembed\.p1_content"):
        db.execute("DROP FUNCTION public.tidy(text)")
    db.execute("DROP FUNCTION public.tidy(text) CASCADE")  # ...and with CASCADE the rows fail
    db.execute("UPDATE notes SET body = body || '!' WHERE id <= 5")
    fleet.start(until_empty=True, max_attempts=1).wait(60)
    errors = [e for (e,) in db.execute("SELECT error FROM pgembed.failures")]
    assert len(errors) == 5 and all("does not exist" in e for e in errors), errors
    assert scalar(db, f"SELECT count(*) FROM pgembed.{name}") == 20, "vectors were deleted as if rows were gone"
