"""Templates, string_check, multi formulas, config validation, and the run/validate endpoints."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.core.errors import InvalidRequest
from service.core.settings import Settings
from service.graders.engine import compile_grader, grade_batch
from service.graders.formula import Formula, FormulaError
from service.graders.schemas import parse_grader
from service.graders.templates import Sample, TemplateError, render

ITEM = {"answer": "42", "meta": {"tags": ["math", "easy"], "n": 3}, "list": [{"x": "first"}]}


def check(op: str, text: str, reference: str = "{{item.answer}}") -> dict[str, Any]:
    return {"type": "string_check", "name": "check", "input": text, "reference": reference, "operation": op}


def grade_one(grader: dict[str, Any], output: str, item: dict[str, Any] | None = None) -> Any:
    with compile_grader(parse_grader(grader), Settings()) as compiled:
        return grade_batch(compiled, [Sample.from_text(output)], [item if item is not None else ITEM]).grades[0]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{item.answer}}", "42"),
        ("{{ item.meta.n }}", "3"),
        ("{{item.meta.tags[1]}}", "easy"),
        ("{{item.list[0].x}}!", "first!"),
        ("{{item.meta.tags}}", '["math", "easy"]'),
        ("{{sample.output_text}}", '{"answer": 41, "tools": []}'),
        ("{{sample.output_json.answer}}", "41"),
        ("no placeholders", "no placeholders"),
    ],
)
def test_templates_resolve_items_and_samples(template: str, expected: str) -> None:
    assert render(template, Sample.from_text('{"answer": 41, "tools": []}'), ITEM) == expected


def test_output_tools_are_addressable() -> None:
    sample = Sample.from_text("", output_tools=[{"function": {"name": "add", "arguments": "{}"}}])
    assert render("{{sample.output_tools[0].function.name}}", sample, {}) == "add"


@pytest.mark.parametrize(
    ("template", "kind"),
    [
        ("{{item.missing}}", "invalid_variable_error"),
        ("{{item.meta.tags[7]}}", "invalid_variable_error"),
        ("{{item.answer.deeper}}", "invalid_variable_error"),
        ("{{sample.output_json.x}}", "sample_parse_error"),
    ],
)
def test_unresolvable_templates_are_sample_errors(template: str, kind: str) -> None:
    with pytest.raises(TemplateError) as info:
        render(template, Sample.from_text("not json"), ITEM)
    assert info.value.kind == kind


@pytest.mark.parametrize(
    ("op", "output", "reward"),
    [
        ("eq", "42", 1.0),
        ("eq", "42 ", 0.0),
        ("ne", "41", 1.0),
        ("ne", "42", 0.0),
        ("like", "it is 42.", 1.0),
        ("like", "it is 4 2", 0.0),
        ("ilike", "ANSWER 42", 1.0),
    ],
)
def test_string_check_operations(op: str, output: str, reward: float) -> None:
    assert grade_one(check(op, "{{sample.output_text}}"), output).reward == reward


def test_ilike_ignores_case_and_like_does_not() -> None:
    grader = check("ilike", "{{sample.output_text}}", "Paris")
    assert grade_one(grader, "the capital is PARIS").reward == 1.0
    assert grade_one({**grader, "operation": "like"}, "the capital is PARIS").reward == 0.0


def test_missing_variable_scores_zero_with_a_counted_error_not_a_crash() -> None:
    grade = grade_one(check("eq", "{{sample.output_text}}", "{{item.nope}}"), "42")
    assert grade.reward == 0.0
    assert "invalid_variable_error" in grade.errors
    assert grade.error_metadata()["invalid_variable_error"] is True
    assert grade.error_metadata()["formula_parse_error"] is False


@pytest.mark.parametrize(
    ("formula", "value"),
    [
        ("a + b", 1.5),
        ("0.3 * a + 0.7 * b", 0.65),
        ("a ^ 2 + b ** 2", 1.25),
        ("min(a, b) - max(a, b)", -0.5),
        ("abs(-a) + floor(1.7) + ceil(0.2)", 3.0),
        ("sqrt(b) * exp(0) + log(1)", 0.5**0.5),
        ("-(a)", -1.0),
    ],
)
def test_formula_evaluates_the_allowed_grammar(formula: str, value: float) -> None:
    assert Formula(formula, {"a", "b"}).evaluate({"a": 1.0, "b": 0.5}) == pytest.approx(value)


@pytest.mark.parametrize(
    ("formula", "words"),
    [
        ("a + c", "'c'"),
        ("__import__('os')", "allowed functions"),
        ("a.real", "may only use"),
        ("[a][0]", "may only use"),
        ("a if b else 1", "may only use"),
        ("open('x')", "allowed functions"),
        ("a +", "not a valid formula"),
        ("'text'", "may only use"),
        ("max()", "at least one argument"),
    ],
)
def test_formula_rejects_anything_else_with_a_reason(formula: str, words: str) -> None:
    with pytest.raises(FormulaError) as info:
        Formula(formula, {"a", "b"})
    assert words in str(info.value)


def multi(formula: str = "0.5 * exact + 0.5 * loose") -> dict[str, Any]:
    return {
        "type": "multi",
        "name": "combo",
        "calculate_output": formula,
        "graders": {"exact": check("eq", "{{sample.output_text}}"), "loose": check("like", "{{sample.output_text}}")},
    }


def test_multi_combines_sub_rewards_with_its_formula() -> None:
    grade = grade_one(multi(), "answer: 42")
    assert grade.reward == 0.5
    assert grade.details["sub_rewards"] == {"exact": 0.0, "loose": 1.0}


def test_multi_runtime_formula_error_is_a_counted_error() -> None:
    grade = grade_one(multi("loose / exact"), "answer: 42")
    assert grade.reward == 0.0 and "division" in grade.errors["other_error"]


@pytest.mark.parametrize(
    ("grader", "param"),
    [
        (
            {"type": "string_check", "name": "x", "input": "a", "reference": "b", "operation": "contains"},
            "grader.operation",
        ),
        ({"type": "string_check", "name": "x", "input": "a", "reference": "b"}, "grader.operation"),
        ({"type": "string_check", "name": "x", "input": "a", "reference": "b", "operation": "eq", "z": 1}, "grader.z"),
        (
            {"type": "string_check", "name": "x", "input": "{{item..a}}", "reference": "b", "operation": "eq"},
            "grader.input",
        ),
        (
            {"type": "text_similarity", "name": "x", "input": "a", "reference": "b", "evaluation_metric": "vibes"},
            "grader.evaluation_metric",
        ),
        ({"type": "score_model", "name": "x", "model": "m", "input": [], "range": [0, 1]}, "grader.input"),
        (
            {
                "type": "score_model",
                "name": "x",
                "model": "m",
                "input": [{"role": "user", "content": "hi"}],
                "range": [1, 0],
            },
            "grader.range",
        ),
        (
            {
                "type": "label_model",
                "name": "x",
                "model": "m",
                "input": [{"role": "user", "content": "hi"}],
                "labels": ["a"],
                "passing_labels": ["b"],
            },
            "grader",
        ),
        (
            {"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": {"type": "multi"}}},
            "grader.graders.a.type",
        ),
        (
            {"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": check("xx", "a")}},
            "grader.graders.a.operation",
        ),
        (
            {"type": "multi", "name": "m", "calculate_output": "b * 2", "graders": {"a": check("eq", "a")}},
            "grader.calculate_output",
        ),
        ({"type": "vibes"}, "grader.type"),
        (  # JSON true is not a temperature of 1 (the fuzzer found it accepted)
            {
                "type": "score_model",
                "name": "x",
                "model": "m",
                "input": [{"role": "user", "content": "hi"}],
                "sampling_params": {"temperature": True},
            },
            "grader.sampling_params.temperature",
        ),
        (  # nor JSON false a pass threshold of 0 (the fuzzer again)
            {
                "type": "text_similarity",
                "name": "x",
                "input": "a",
                "reference": "b",
                "evaluation_metric": "bleu",
                "pass_threshold": False,
            },
            "grader.pass_threshold",
        ),
        (
            {
                "type": "score_model",
                "name": "x",
                "model": "m",
                "input": [{"role": "user", "content": "hi"}],
                "range": [False, 1],
            },
            "grader.range.0",
        ),
    ],
)
def test_invalid_grader_configs_name_the_bad_field(grader: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_grader(grader)
    assert info.value.param == param
    assert info.value.message


def test_validate_endpoint_echoes_a_valid_grader(client: TestClient, auth: dict[str, str]) -> None:
    grader = multi()
    response = client.post("/v1/fine_tuning/alpha/graders/validate", headers=auth, json={"grader": grader})
    assert response.status_code == 200, response.text
    assert response.json()["grader"]["graders"]["exact"]["operation"] == "eq"


def test_validate_endpoint_400_names_the_field(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post(
        "/v1/fine_tuning/alpha/graders/validate", headers=auth, json={"grader": check("contains", "a")}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "grader.operation"


def test_run_endpoint_returns_openai_shape(client: TestClient, auth: dict[str, str]) -> None:
    response = client.post(
        "/v1/fine_tuning/alpha/graders/run",
        headers=auth,
        json={"grader": multi(), "model_sample": "it is 42", "item": {"answer": "42"}},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["reward"] == 0.5
    assert body["sub_rewards"] == {"exact": 0.0, "loose": 1.0}
    assert body["metadata"]["name"] == "combo" and body["metadata"]["type"] == "multi"
    assert body["metadata"]["execution_time"] >= 0
    assert set(body["metadata"]["errors"]) >= {
        "formula_parse_error",
        "invalid_variable_error",
        "python_grader_runtime_error",
        "model_grader_parse_error",
    }
    assert body["model_grader_token_usage_per_model"] == {}


def test_run_endpoint_requires_auth(client: TestClient) -> None:
    response = client.post("/v1/fine_tuning/alpha/graders/run", json={"grader": multi(), "model_sample": "x"})
    assert response.status_code == 401


def test_job_with_invalid_nested_grader_is_400_naming_it(
    client: TestClient, auth: dict[str, str], files: tuple[str, str]
) -> None:
    body = {
        "model": "m",
        "training_file": files[0],
        "method": {
            "type": "reinforcement",
            "reinforcement": {
                "grader": {"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": check("xx", "a")}}
            },
        },
    }
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "method.reinforcement.grader.graders.a.operation"


def test_run_endpoint_reports_python_runtime_errors(client: TestClient, auth: dict[str, str]) -> None:
    grader = {"type": "python", "name": "py", "source": "def grade(sample, item):\n    return 1 / 0\n"}
    body = client.post(
        "/v1/fine_tuning/alpha/graders/run", headers=auth, json={"grader": grader, "model_sample": "x", "item": {}}
    ).json()
    assert body["reward"] == 0.0
    errors = body["metadata"]["errors"]
    assert errors["python_grader_runtime_error"] is True
    assert "ZeroDivisionError" in errors["python_grader_runtime_error_details"]


def test_batch_grades_publish_per_grader_means_and_error_rates() -> None:
    from service.graders.engine import BatchGrades

    config = parse_grader(multi("exact + loose"))
    outputs = ["42", "it is 42", "nope"]
    items = [{"answer": "42"}, {"answer": "42"}, {}]
    with compile_grader(config, Settings()) as compiled:
        batch: BatchGrades = grade_batch(compiled, [Sample.from_text(o) for o in outputs], items)
    assert batch.rewards == [2.0, 1.0, 0.0]
    assert batch.grader_means() == {"exact": pytest.approx(1 / 3), "loose": pytest.approx(2 / 3)}
    assert batch.error_rates()["invalid_variable_error_mean"] == pytest.approx(1 / 3)
    assert batch.error_counts() == {"exact": {"invalid_variable_error": 1}, "loose": {"invalid_variable_error": 1}}
    assert batch.grader_types == {"exact": "string_check", "loose": "string_check"}


def tiny_judge(content: Any) -> dict[str, Any]:
    return {
        "type": "score_model",
        "name": "judge",
        "model": "tiny-random-llama",
        "input": [{"role": "system", "content": "Rate it."}, {"role": "user", "content": content}],
        "sampling_params": {"max_completions_tokens": 3},
    }


SDK_TEXT_SHAPES = [
    "Answer: {{sample.output_text}} (expected {{item.answer}})",
    {"type": "input_text", "text": "Answer: {{sample.output_text}} (expected {{item.answer}})"},
    {"type": "output_text", "text": "Answer: {{sample.output_text}} (expected {{item.answer}})"},
    [
        "Answer: ",
        {"type": "input_text", "text": "{{sample.output_text}}"},
        {"type": "output_text", "text": " (expected {{item.answer}})"},
    ],
]


@pytest.mark.parametrize("content", SDK_TEXT_SHAPES)
def test_model_grader_content_in_every_sdk_text_shape_is_templated_into_the_same_prompt(
    client: TestClient, auth: dict[str, str], content: Any
) -> None:
    """A string, an input_text or output_text part, or a list of those: the judge reads the same text."""
    import openai

    sdk = openai.OpenAI(
        base_url="http://testserver/v1", api_key=auth["Authorization"].split()[1], http_client=client, max_retries=0
    )
    assert sdk.fine_tuning.alpha.graders.validate(grader=tiny_judge(content)).grader is not None  # type: ignore[arg-type]
    results = [
        sdk.fine_tuning.alpha.graders.run(grader=tiny_judge(c), model_sample="41", item={"answer": "42"})  # type: ignore[arg-type]
        for c in (SDK_TEXT_SHAPES[0], content)
    ]
    usage = [r.api_model_grader_token_usage_per_model["tiny-random-llama"] for r in results]
    assert usage[0] == usage[1]  # same prompt tokens, same (greedy) answer length
    assert results[0].metadata.scores == results[1].metadata.scores


@pytest.mark.parametrize(
    "content",
    [
        {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "low"},
        ["Look: ", {"type": "input_image", "image_url": "https://example.com/cat.png"}],
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    ],
)
def test_image_and_audio_grader_content_is_a_400_saying_judges_read_text(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], content: Any
) -> None:
    response = client.post("/v1/fine_tuning/alpha/graders/validate", headers=auth, json={"grader": tiny_judge(content)})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "grader.input.1.content"
    assert "not supported" in error["message"] and "input_text" in error["message"]
    body = {
        "model": "tiny-random-llama",
        "training_file": files[0],
        "method": {"type": "reinforcement", "reinforcement": {"grader": tiny_judge(content)}},
    }
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "method.reinforcement.grader.input.1.content"


def test_a_malformed_placeholder_in_a_content_part_is_a_400(client: TestClient, auth: dict[str, str]) -> None:
    grader = tiny_judge(["ok", {"type": "input_text", "text": "{{ items.answer }}"}])
    response = client.post("/v1/fine_tuning/alpha/graders/validate", headers=auth, json={"grader": grader})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "grader.input.1.content"


def test_python_grader_image_tag_is_refused_naming_the_one_environment(
    client: TestClient, auth: dict[str, str]
) -> None:
    grader = {"type": "python", "name": "py", "source": "def grade(sample, item):\n    return 1.0\n"}
    response = client.post(
        "/v1/fine_tuning/alpha/graders/validate", headers=auth, json={"grader": {**grader, "image_tag": "2025-05-08"}}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "grader.image_tag"
    assert "/graders/environment" in response.json()["error"]["message"]


def test_run_with_a_reference_answer_is_refused_saying_to_put_it_in_item(
    client: TestClient, auth: dict[str, str]
) -> None:
    body = {"grader": check("eq", "{{sample.output_text}}"), "model_sample": "42", "reference_answer": "42"}
    response = client.post("/v1/fine_tuning/alpha/graders/run", headers=auth, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "reference_answer"
    assert "item.reference_answer" in response.json()["error"]["message"]
