"""The numpy runtime embeds as sentence-transformers does, and refuses models it cannot run.

Checked against sentence-transformers itself, in the same process, on real abstracts and
on text built to be awkward (markup, emoji, CJK, a row longer than the window)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pgembed.providers.bert import BertEncoder, UnsupportedModel
from pgembed.providers.local import resolve_model

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact" / "corpus.jsonl"
MODEL = Path(resolve_model("all-MiniLM-L6-v2"))
AWKWARD = [
    "a", "[red]rich[/red] <b>html</b> $body$ 'quotes' \"double\" \\ back\nslash\ttab",
    "emoji 🧬🦠 and 中文文本 and Ελληνικά", "word " * 400,  # the last is longer than the window
]


@pytest.fixture(scope="module")
def encoder() -> BertEncoder:
    return BertEncoder(MODEL)


def texts() -> list[str]:
    with CORPUS.open(encoding="utf-8") as lines:
        docs = [json.loads(next(lines)) for _ in range(6)]
    return [f"{d['title']} {d['text']}" for d in docs] + AWKWARD


def test_vectors_match_sentence_transformers(encoder: BertEncoder) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(MODEL), local_files_only=True)
    given = texts()
    ours = encoder.encode(given)
    theirs = reference.encode(given, batch_size=32, normalize_embeddings=True)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (len(given), 384)
    assert float(np.abs(ours - theirs).max()) < 1e-5
    counted = reference.tokenizer(given, add_special_tokens=True, truncation=False, verbose=False)
    assert encoder.token_counts(given) == [len(ids) for ids in counted["input_ids"]]
    assert encoder.max_seq_length == reference.max_seq_length == 256


def test_order_and_batching_do_not_change_a_vector(encoder: BertEncoder) -> None:
    given = [t[:200] for t in texts()[:6]] + AWKWARD[:3]  # padding to unlike lengths
    alone = np.stack([encoder.encode([t])[0] for t in given])
    together = encoder.encode(list(reversed(given)), batch_size=4)[::-1]
    assert float(np.abs(alone - together).max()) < 1e-5


def variant(tmp_path: Path, file: str, change: dict[str, object]) -> Path:
    target = tmp_path / "model"
    shutil.copytree(MODEL, target, ignore=shutil.ignore_patterns("*.safetensors"))
    (target / "model.safetensors").symlink_to(MODEL / "model.safetensors")
    data = json.loads((target / file).read_text())
    data.update(change)
    (target / file).write_text(json.dumps(data))
    return target


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("config.json", {"model_type": "roberta"}, "model_type is 'roberta'"),
        ("config.json", {"hidden_act": "relu"}, "hidden_act is 'relu'"),
        ("config.json", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ("1_Pooling/config.json", {"pooling_mode_cls_token": True}, "mean Pooling"),
        ("1_Pooling/config.json", {"pooling_mode_mean_tokens": False}, "mean Pooling"),
    ],
)
def test_a_model_of_another_shape_is_refused(tmp_path: Path, file: str, change: dict[str, object],
                                             message: str) -> None:
    with pytest.raises(UnsupportedModel, match=message):
        BertEncoder(variant(tmp_path, file, change))


def test_a_directory_without_the_model_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModel, match=r"cannot read config\.json"):
        BertEncoder(tmp_path)
