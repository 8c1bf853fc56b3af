"""The hash provider embeds a batch in one numpy pass: each text's vector is exactly the one
it gets alone, whatever else is in the batch (an empty text included)."""

from __future__ import annotations

import asyncio

import numpy as np

from pgembed.providers import ModelSpec
from pgembed.providers.hashing import HashProvider, hash_array, hash_vector


def test_a_batch_gives_each_text_its_own_vector() -> None:
    texts = ["In the beginning", "", "the the the", "Ünïcode wörds, and numbers 42", "!!!"]
    spec = ModelSpec(model="hash:16", dimensions=16, native_dimensions=16)
    result = asyncio.run(HashProvider(spec).embed(texts))
    for text, vector in zip(texts, result.vectors, strict=True):
        assert np.array_equal(vector, hash_array(text, 16))
        assert np.isclose(np.linalg.norm(vector), 1.0)
    assert hash_vector("", 4) == [1.0, 0.0, 0.0, 0.0]
    assert result.token_counts == [3, 0, 3, 5, 0]


def test_repeated_words_add_up() -> None:
    one, three = hash_array("word", 8), hash_array("word word word", 8)
    assert np.array_equal(one, three)  # normalised: same direction
    assert np.count_nonzero(one) == 1
