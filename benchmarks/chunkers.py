"""Which library cuts pgembed's chunks: semantic-text-splitter against LangChain's
RecursiveCharacterTextSplitter, both measuring in MiniLM's own WordPiece tokens, at the
default budget for local:all-MiniLM-L6-v2 (192 tokens, 28 overlap).

For each: seconds to chunk SciFact's 5,183 abstracts (title + text, as the quality scenario
embeds them), how many chunks, the longest chunk in model tokens ([CLS]/[SEP] included: over
256 the model would cut it), and SciFact nDCG@10 on the 809 train queries, exact max-sim
search over the chunks in numpy (no database: the splitter is all that differs).

    nice -n 10 python -m benchmarks.chunkers [DOCS]   # ~10 minutes on 2 idle cores, most of it encoding

With DOCS, the quality figure is taken on that many documents (those the qrels of the
first queries name, then others) and those queries; the chunking time is always over the
whole corpus.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from benchmarks.harness import DATA
from pgembed.evaluation import beir
from pgembed.evaluation.metrics import evaluate
from pgembed.providers.base import ModelSpec
from pgembed.providers.local import chunk_counter, load_model, resolve_model
from pgembed.splitting import Plan, split

SPEC = ModelSpec("local:all-MiniLM-L6-v2", 384, 384, max_input_tokens=256)
SIZE, OVERLAP = 192, 28


def semantic_text_splitter() -> Callable[[str], list[str]]:
    counter = chunk_counter(SPEC)
    plan = Plan("recursive", SIZE, OVERLAP)
    return lambda text: [p.text for p in split(plan, counter, text)]


def langchain(model) -> Callable[[str], list[str]]:
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    tokenizer = model.tokenizer
    splitter = RecursiveCharacterTextSplitter(
        chunk_size=SIZE, chunk_overlap=OVERLAP,
        length_function=lambda t: len(tokenizer(t, add_special_tokens=False, truncation=False)["input_ids"]))
    return splitter.split_text


def main(argv: list[str]) -> int:
    everything = beir.load(DATA / "scifact")
    corpus = beir.load(DATA / "scifact", max_docs=int(argv[0])) if argv else everything
    model = load_model(resolve_model("all-MiniLM-L6-v2"))

    def encode(texts):
        return model.encode(texts)

    qids = list(corpus.queries)
    queries = encode([corpus.queries[q] for q in qids])
    results = {}
    for name, make in (("semantic-text-splitter", semantic_text_splitter), ("langchain", lambda: langchain(model))):
        cut = make()
        started = time.perf_counter()
        every = [(doc, c) for doc, (title, body) in everything.docs.items() for c in cut(f"{title} {body}")]
        seconds = time.perf_counter() - started
        chunks = [(doc, c) for doc, c in every if doc in corpus.docs]
        longest = max(len(model.tokenizer(c, truncation=False)["input_ids"]) for _, c in every)
        run = beir.max_sim_run(queries, qids, encode([c for _, c in chunks]), chunks)
        results[name] = {"chunk_seconds": round(seconds, 2), "chunks": len(every), "longest_tokens": longest,
                         "documents": len(corpus.docs), "queries": len(qids),
                         **{k: round(v, 4) for k, v in evaluate(corpus.qrels, run).items()}}
        print(name, results[name], file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
