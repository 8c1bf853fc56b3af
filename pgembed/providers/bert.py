"""A BERT sentence encoder in numpy: all-MiniLM-L6-v2, and models of its shape, without torch.

`local:` models normally run on sentence-transformers, which needs torch: some 750 MB on
disk, and on most platforms `pip install torch` pulls gigabytes of CUDA libraries a CPU
host never uses. So a fresh `pip install 'pgembed[minilm]'` would have no semantic model
at all. A six-layer BERT is a few matrix products per layer, which numpy (whose BLAS
spreads them over every core) runs directly from the model's own files: `tokenizer.json`
through `tokenizers` and `model.safetensors` through `safetensors`, both small Rust wheels.
Its vectors match sentence-transformers' to float32 rounding (tests/test_bert.py), so the
same rows get the same results whichever runtime embedded them.

Only what such models use is implemented (absolute positions, GELU, mean pooling, a
Normalize module); a model directory that asks for anything else is refused in one
sentence rather than embedded differently.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODULES = ["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
           "sentence_transformers.models.Normalize"]


class UnsupportedModel(ValueError):
    """The directory holds a model this runtime would not embed as its authors meant."""


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    layers: int
    eps: float
    max_seq_length: int


def _read_json(directory: Path, name: str) -> Any:
    try:
        return json.loads((directory / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UnsupportedModel(f"{directory}: cannot read {name} ({error})") from None


def _shape(directory: Path) -> Shape:
    """The model's dimensions, refusing anything but a mean-pooled, normalised BERT."""
    config = _read_json(directory, "config.json")
    wanted = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
    for key, value in wanted.items():
        if config.get(key, value) != value:
            raise UnsupportedModel(f"{directory}: {key} is {config.get(key)!r}; this runtime runs {value!r} only")
    modules = [m.get("type") for m in _read_json(directory, "modules.json")]
    pooling = _read_json(directory, "1_Pooling/config.json")
    if modules != MODULES or not pooling.get("pooling_mode_mean_tokens") or any(
            v for k, v in pooling.items() if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens"):
        raise UnsupportedModel(f"{directory}: this runtime needs Transformer, mean Pooling and Normalize modules")
    window = _read_json(directory, "sentence_bert_config.json").get("max_seq_length")
    return Shape(hidden=config["hidden_size"], heads=config["num_attention_heads"],
                 layers=config["num_hidden_layers"], eps=config.get("layer_norm_eps", 1e-12),
                 max_seq_length=int(window or config["max_position_embeddings"]))


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, x·(1 + erf(x/√2))/2, in place on two scratch arrays: numpy has no
    erf, so it is Abramowitz and Stegun's 7.1.26 (error under 1.5e-7, below float32's
    rounding), and on arrays this size the temporaries of a plain expression cost more than
    the arithmetic. The square is capped at 40, where erf is 1 in float32 already: beyond
    it exp() would make subnormals, which the CPU computes far more slowly."""
    a = np.abs(x)
    a *= np.float32(1.0 / math.sqrt(2.0))
    t = a * np.float32(0.3275911)
    t += 1.0
    np.reciprocal(t, out=t)
    poly = t * np.float32(1.061405429)
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly += np.float32(c)
        poly *= t
    np.multiply(a, a, out=a)
    np.minimum(a, 40.0, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    poly *= a  # 1 - erf(|x|/√2)
    np.subtract(1.0, poly, out=poly)
    np.copysign(poly, x, out=poly)  # erf(x/√2)
    poly += 1.0
    poly *= x
    poly *= 0.5
    return poly


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """softmax(q·kᵀ/√d + bias)·v per text and head. One 2-d BLAS product a head: numpy's
    stacked matmul runs these small products several times slower."""
    scale = np.float32(1.0 / math.sqrt(q.shape[-1]))
    out = np.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            scores = q[b, h] @ k[b, h].T
            scores *= scale
            scores += bias[b]
            scores -= scores.max(-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(-1, keepdims=True)
            np.matmul(scores, v[b, h], out=out[b, h])
    return out


class BertEncoder:
    """One loaded model: `encode` gives unit vectors, as SentenceTransformer.encode does with
    normalize_embeddings=True. Thread-safe to call; numpy releases the GIL in its BLAS."""

    def __init__(self, directory: Path) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        self.shape = _shape(directory)
        self.max_seq_length = self.shape.max_seq_length
        self.dimensions = self.shape.hidden
        self.weights: dict[str, np.ndarray] = load_file(str(directory / "model.safetensors"))
        # one copy counts (no truncation: a text's full length decides whether it fits),
        # the other cuts at the window, as the model reads
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.special_tokens = self.tokenizer.num_special_tokens_to_add(False)  # [CLS], [SEP]
        self._cutting = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self._cutting.no_padding()
        self._cutting.enable_truncation(self.max_seq_length)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens per text, [CLS] and [SEP] included, as the window counts them."""
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts)]

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Unit vectors, float32, one row a text; texts of like length are batched together,
        so that padding costs little."""
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            picked = order[start:start + batch_size]
            out[picked] = self._batch([texts[i] for i in picked])
        return out

    def _batch(self, texts: list[str]) -> np.ndarray:
        ids, mask = self._ids(texts)
        x = self.hidden_states(ids, mask)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    def hidden_states(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The last layer's state of every token (batch, width, hidden), padding (mask 0)
        masked out of attention: what mean pooling, and late chunking, average."""
        mask = mask.astype(np.float32)
        x = self._embed(ids)
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, :]  # per text, over the keys
        for layer in range(self.shape.layers):
            x = self._layer(x, bias, f"encoder.layer.{layer}.")
        return x

    def _ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = self._cutting.encode_batch(texts)
        width = max(len(e.ids) for e in encoded)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.float32)
        for row, e in enumerate(encoded):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1.0
        return ids, mask

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        w = self.weights
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:ids.shape[1]]
             + w["embeddings.token_type_embeddings.weight"][0])
        return self._norm(x, "embeddings.LayerNorm")

    def _layer(self, x: np.ndarray, bias: np.ndarray, p: str) -> np.ndarray:
        batch, width, hidden = x.shape
        heads = self.shape.heads
        size = hidden // heads

        def split(name: str) -> np.ndarray:
            projected = self._linear(x, f"{p}attention.self.{name}").reshape(batch, width, heads, size)
            return np.ascontiguousarray(projected.transpose(0, 2, 1, 3))

        context = _attention(split("query"), split("key"), split("value"), bias)
        context = context.transpose(0, 2, 1, 3).reshape(batch, width, hidden)
        x = self._norm(self._linear(context, f"{p}attention.output.dense") + x, f"{p}attention.output.LayerNorm")
        inner = _gelu(self._linear(x, f"{p}intermediate.dense"))
        return self._norm(self._linear(inner, f"{p}output.dense") + x, f"{p}output.LayerNorm")

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        """One BLAS product over every token of the batch: a 3-d @ 2-d product is a loop
        of small ones, a tenth of the speed."""
        flat = x.reshape(-1, x.shape[-1]) @ self.weights[f"{name}.weight"].T + self.weights[f"{name}.bias"]
        return flat.reshape(*x.shape[:-1], flat.shape[-1])

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        centred = x - mean
        variance = (centred * centred).mean(-1, keepdims=True)
        return centred / np.sqrt(variance + np.float32(self.shape.eps)) * self.weights[f"{name}.weight"] \
            + self.weights[f"{name}.bias"]
