"""The batch's vector checks (pgembed.providers.base.sound_vectors) say what the one-vector
check says, vector by vector, and keep the sound vectors exactly (as float32)."""

from __future__ import annotations

import numpy as np

from pgembed.providers.base import sound_vectors, vector_problem


def test_a_mixed_answer_is_judged_vector_by_vector() -> None:
    vectors = [[0.6, 0.8, 0.0], None, [1.0, 2.0], [float("nan"), 1.0, 0.0], [float("inf"), 0.0, 0.0],
               [1e39, 0.0, 0.0], [0.0, 0.0, 0.0], np.array([0.0, 0.0, 1.0], dtype=np.float32), [-1.0, 0.0, 0.0]]
    matrix, problems = sound_vectors(vectors, 3)
    assert problems == [None if v is None else vector_problem(v, 3) for v in vectors]
    assert problems[1] is None and all(problems[i] for i in (2, 3, 4, 5, 6))
    for i in (0, 7, 8):
        assert matrix[i].dtype == np.float32
        assert np.array_equal(matrix[i], np.asarray(vectors[i], dtype=np.float32))


def test_no_vector_of_the_right_size() -> None:
    matrix, problems = sound_vectors([[1.0], None], 2)
    assert matrix.shape == (2, 2)
    assert problems == ["provider returned 1 dimensions, expected 2", None]
