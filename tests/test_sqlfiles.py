"""The named-query loader: the real queries.sql loads, and malformed text is refused with
an error that names the file and the line instead of a query silently going missing."""

from __future__ import annotations

import re

import pytest

from pgembed import sqlfiles
from pgembed.sqlfiles import QueryFileError, UnknownQueryError, parse_queries, query


def test_the_real_queries_file_loads():
    found = sqlfiles.queries()
    assert "claim" in found and "pipeline_create" in found and "has_versions" in found
    for name, body in found.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name)
        assert any(line.strip() and not line.strip().startswith("--") for line in body.splitlines())


def test_blocks_map_names_to_trimmed_bodies_keeping_comments():
    text = "-- header comment\n\n-- one --\n-- why\nSELECT 1\n\n-- two_2 --\nSELECT 2\n  FROM x\n"
    assert parse_queries(text) == {"one": "-- why\nSELECT 1", "two_2": "SELECT 2\n  FROM x"}


def test_a_duplicate_name_is_refused():
    text = "-- one --\nSELECT 1\n\n-- two --\nSELECT 2\n\n-- one --\nSELECT 3\n"
    with pytest.raises(QueryFileError, match=r'^sql/queries\.sql:7: duplicate query name "one"') as info:
        parse_queries(text)
    assert info.value.line == 7 and info.value.filename == "sql/queries.sql"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("body", ["", "\n\n", "-- only a comment\n\n-- and another\n"])
def test_an_empty_body_is_refused(body):
    text = f"-- one --\nSELECT 1\n\n-- empty --\n{body}-- three --\nSELECT 3\n"
    with pytest.raises(QueryFileError, match=r'^sql/queries\.sql:4: query "empty" has an empty body'):
        parse_queries(text)


def test_an_empty_last_block_is_refused():
    with pytest.raises(QueryFileError, match=r":2: query \"last\" has an empty body"):
        parse_queries("-- preamble\n-- last --\n   \n-- trailing comment\n")


@pytest.mark.parametrize("name", ["Claim", "2fast", "has-dash", "two words", "_private", "é"])
def test_a_name_it_cannot_parse_is_refused(name):
    text = f"-- fine --\nSELECT 1\n-- {name} --\nSELECT 2\n"
    with pytest.raises(QueryFileError, match=rf"^sql/queries\.sql:3: cannot parse query name \"{re.escape(name)}\""):
        parse_queries(text)


def test_text_before_the_first_block_is_refused():
    with pytest.raises(QueryFileError, match=r"^q\.sql:3: text before the first `-- name --` block"):
        parse_queries("-- a comment is fine\n\nSELECT 'orphan'\n-- one --\nSELECT 1\n", "q.sql")


def test_text_without_any_block_is_refused_but_comments_alone_are_nothing():
    with pytest.raises(QueryFileError, match=r":1: text before"):
        parse_queries("SELECT 1\n")
    assert parse_queries("-- nothing here\n\n") == {}


def test_an_unknown_name_is_a_clear_key_error():
    with pytest.raises(KeyError) as info:
        query("no_such_query")
    assert isinstance(info.value, UnknownQueryError)
    assert str(info.value) == 'no query named "no_such_query" in sql/queries.sql'
