"""The gateway survives bad input (issue 15, acceptance 6): malformed JSON, wrong types,
bodies of 10 MB (announced, or streamed without a length), 5,000 inputs, empty strings,
no token; each a 4xx in OpenAI's error shape, unknown fields ignored as OpenAI ignores
them, and the server still answers a good request afterwards."""

from __future__ import annotations

import json
import select
import socket
import urllib.parse

import httpx2 as httpx
import pytest

from tests.conftest import _database
from tests.fakeapi import FakeAPI
from tests.gateway_server import TOKEN, gateway

AUTH = {"Authorization": f"Bearer {TOKEN}"}
GOOD = {"model": "text-embedding-3-small", "input": "a good request"}
TEN_MB = 10 * 1024 * 1024


def _raw(url: str, path: str, head: dict[str, str], chunks) -> tuple[int, bytes]:
    """A POST sent by hand (httpx would send the whole body first), stopping as soon as the
    server answers; returns the status and the answer's body."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        lines = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", *(f"{k}: {v}" for k, v in head.items())]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # answered before the body was all sent
            sock.sendall(chunk)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def announced_ten_mb(url):
    head = {**AUTH, "Content-Type": "application/json", "Content-Length": str(TEN_MB)}
    return _raw(url, "/v1/embeddings", head, [b'{"model": "text-embedding-3-small", "input": "'])


def streamed_ten_mb(url):
    head = {**AUTH, "Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    piece = b"x" * 65536
    chunks = [b'{"model": "text-embedding-3-small", "input": "'] + [piece] * (TEN_MB // len(piece))
    return _raw(url, "/v1/embeddings", head, (b"%x\r\n%s\r\n" % (len(c), c) for c in chunks))


def post(body=None, *, content=None, headers=None, path="/embeddings"):
    def send(url):
        answer = httpx.post(f"{url}{path}", json=body, content=content, headers={**AUTH, **(headers or {})},
                            timeout=60)
        return answer.status_code, answer.content
    return send


def get(path):
    def send(url):
        answer = httpx.get(f"{url}{path}", headers=AUTH, timeout=60)
        return answer.status_code, answer.content
    return send


CASES = [
    ("malformed JSON", post(content=b'{"model": "text-embedding-3-small", "input": '), 400, "not valid JSON"),
    ("not UTF-8", post(content=b'{"input": "\xff\xfe"}'), 400, "not valid JSON"),
    ("not an object", post([1, 2, 3]), 400, "JSON object"),
    ("no model", post({"input": "x"}), 400, "model"),
    ("model of the wrong type", post({"model": 7, "input": "x"}), 400, "model"),
    ("input a number", post({"model": "text-embedding-3-small", "input": 42}), 400, "input"),
    ("input an object", post({"model": "text-embedding-3-small", "input": {"a": 1}}), 400, "input"),
    ("input a list of mixed types", post({"model": "text-embedding-3-small", "input": ["a", None]}), 400, "input"),
    ("token arrays", post({"model": "text-embedding-3-small", "input": [1, 2, 3]}), 400, "token-array"),
    ("lists of token arrays", post({"model": "text-embedding-3-small", "input": [[1, 2]]}), 400, "token-array"),
    ("an empty string", post({"model": "text-embedding-3-small", "input": ""}), 400, "empty"),
    ("an empty string among others", post({"model": "text-embedding-3-small", "input": ["a", ""]}), 400, "empty"),
    ("an empty list", post({"model": "text-embedding-3-small", "input": []}), 400, "input"),
    ("5,000 inputs", post({"model": "text-embedding-3-small", "input": ["x"] * 5000}), 400, "2048"),
    ("dimensions a string", post({**GOOD, "dimensions": "many"}), 400, "dimensions"),
    ("dimensions a boolean", post({**GOOD, "dimensions": True}), 400, "dimensions"),
    ("an unknown encoding", post({**GOOD, "encoding_format": "int8"}), 400, "encoding_format"),
    ("a user that is not a string", post({**GOOD, "user": ["me"]}), 400, "user"),
    ("a label too long", post(GOOD, headers={"X-Pgembed-Task": "t" * 500}), 400, "task"),
    ("an unknown model", post({**GOOD, "model": "gpt-none"}), 404, "does not exist"),
    ("10 MB announced", announced_ten_mb, 413, "limit"),
    ("10 MB streamed without a length", streamed_ten_mb, 413, "limit"),
    ("no token", post(GOOD, headers={"Authorization": ""}), 401, "Bearer"),
    ("a token of another scheme", post(GOOD, headers={"Authorization": f"Basic {TOKEN}"}), 401, "Bearer"),
    ("search: malformed JSON", post(content=b"{", path="/search"), 400, "not valid JSON"),
    ("search: k a string", post({"target": "t", "query": "q", "k": "5"}, path="/search"), 400, "'k'"),
    ("search: vector of strings", post({"target": "t", "vector": ["a"]}, path="/search"), 400, "vector"),
    ("search: filter a list", post({"target": "t", "query": "q", "filter": [1]}, path="/search"), 400, "filter"),
    ("search: no token", post({"target": "t", "query": "q"}, headers={"Authorization": ""}, path="/search"),
     401, "Bearer"),
    ("an unknown route", post(GOOD, path="/chat/completions"), 404, "no such route"),
    ("a wrong method", get("/embeddings"), 405, "method not allowed"),
    ("unknown fields are ignored", post({**GOOD, "frobnicate": {"deep": [1]}, "extra_body": 3}), 200, "embedding"),
]


@pytest.fixture(scope="module")
def served(pg_base, template):
    """One gateway for every case: that it keeps answering after all of them is the point."""
    with FakeAPI() as api, pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGEMBED_OPENAI_BASE_URL", api.base_url)
        patch.setenv("PGEMBED_OPENAI_API_KEY", "sk-test-not-a-real-key")
        database = _database(pg_base, template)
        dsn = next(database)
        with gateway(dsn, max_body_bytes=4 * 1024 * 1024) as url:
            yield url, api
        next(database, None)


@pytest.mark.parametrize(("case", "send", "status", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_4xx(served, case, send, status, words):
    url, _ = served
    code, body = send(url)
    assert code == status, body[:300]
    text = body.decode()
    assert words in text
    if status != 200:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    good = httpx.post(f"{url}/embeddings", json=GOOD, headers=AUTH, timeout=60)
    assert good.status_code == 200 and len(good.json()["data"][0]["embedding"]) == 1536
    assert httpx.get(url.removesuffix("/v1") + "/healthz").json()["status"] == "ok"
