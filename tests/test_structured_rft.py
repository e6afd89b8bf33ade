"""Structured outputs and tool calls in RFT: `method.reinforcement.response_format` holds training
and evaluation samples to its schema, data lines' `tools` reach the chat template and come back as
`sample.output_tools`, `label_model` graders answer with a label, and bad formats or tools are
refused with the field and line named. The models are random: only the constraint makes them parse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.tables import Job, JobEvent, JobMetric
from service.files.validation import validate_jsonl
from service.graders.engine import compile_grader, grade_batch
from service.graders.schemas import parse_grader
from service.graders.templates import Sample, render
from service.models.constraints import from_response_format
from service.models.registry import tiny_llama
from tests.conftest import job_body, jsonl, train_local_model
from tests.support.sdk import sdk
from workers.rl.engine import TorchEngine

TOOLS_TEMPLATE = (
    Path(__file__).resolve().parent.parent / "examples" / "tool_calling" / "chat_template.jinja"
).read_text()
REPORT = {
    "type": "object",
    "properties": {"unit": {"enum": ["C", "F"]}, "value": {"type": "integer", "minimum": -50, "maximum": 50}},
    "required": ["unit", "value"],
    "additionalProperties": False,
}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT, "strict": True}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Oslo", "Paris"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CALL_SHAPE = {  # the bare JSON call form, so a random model's every answer is a call
    "type": "object",
    "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER["function"]["parameters"]},  # type: ignore[index]
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
CALL_GRADER = """
import json
def grade(sample, item):
    calls = sample["output_tools"]
    if not calls or calls[0]["function"]["name"] != "get_weather":
        return 0.0
    return 0.5 + 0.5 * (json.loads(calls[0]["function"]["arguments"])["city"] == item["city"])
"""
IS_REPORT = """
def grade(sample, item):
    report = sample["output_json"]
    return float(isinstance(report, dict) and report["unit"] in ("C", "F") and -50 <= report["value"] <= 50)
"""
HYPER = {"batch_size": 2, "compute_multiplier": 1, "max_completion_tokens": 48, "eval_samples": 2, "n_epochs": 1}


def lines_asking(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"weather {i}?"}], "city": "Oslo", **extra} for i in range(n)]


def metric_rows(settings: Settings, job_id: str) -> list[dict[str, Any]]:
    with unit_of_work(settings) as session:
        return [m.data for m in session.scalars(select(JobMetric).where(JobMetric.job_id == job_id))]


@pytest.mark.parametrize("greedy", [True, False])
def test_constrained_rollouts_of_a_random_model_parse_against_the_schema(greedy: bool) -> None:
    model, tokenizer = tiny_llama()
    rollout = TorchEngine(model, tokenizer).sample(
        [[{"role": "user", "content": "a"}], [{"role": "user", "content": "a longer prompt"}]],
        3,
        max_new_tokens=48,
        temperature=1.0,
        top_p=0.95,
        seed=4,
        greedy=greedy,
        keep_prefix=not greedy,
        constraint=from_response_format(JSON_FORMAT, "response_format"),
    )
    assert rollout.finish_reasons == ["stop"] * 6
    for text in rollout.texts:
        jsonschema.validate(json.loads(text), REPORT)
    assert rollout.sampler_logprobs is not None and bool(rollout.sampler_logprobs.isfinite().all())


def test_rollouts_render_each_conversations_tools() -> None:
    model, tokenizer = tiny_llama()
    tokenizer.chat_template = TOOLS_TEMPLATE
    asked = [[{"role": "user", "content": "weather?"}]] * 2
    rollout = TorchEngine(model, tokenizer).sample(
        asked, 1, max_new_tokens=1, temperature=1.0, top_p=1.0, seed=0, tools=[[WEATHER], None]
    )
    prompts = [
        tokenizer.decode(row[: rollout.prompt_len][mask[: rollout.prompt_len].bool()])
        for row, mask in zip(rollout.input_ids, rollout.attention_mask, strict=True)
    ]
    assert '"name": "get_weather"' in prompts[0] and "<tools>" in prompts[0]
    assert "<tools>" not in prompts[1]


def test_a_jobs_response_format_holds_its_training_and_evaluation_samples(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    grader = {"type": "python", "name": "report", "source": IS_REPORT}
    job_id = train_local_model(
        live_client, live_auth, live_settings, Path("tiny-random-llama"), lines_asking(4), grader, HYPER, JSON_FORMAT
    )
    rows = metric_rows(live_settings, job_id)
    assert rows and all(r["train_reward_mean"] == 1.0 for r in rows)
    assert rows[-1]["valid_reward_mean"] == 1.0
    for sample in rows[-1]["valid_samples"]:
        jsonschema.validate(json.loads(sample["completion"]), REPORT)
    with unit_of_work(live_settings) as session:
        baseline = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.message.like("Baseline%"))
        ).one()
    assert baseline.data is not None and baseline.data["reward"] == 1.0


def test_tool_lines_reach_the_template_and_graders_read_the_calls(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, tmp_path: Path
) -> None:
    model, tokenizer = tiny_llama()
    tokenizer.chat_template = TOOLS_TEMPLATE
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    grader = {"type": "python", "name": "call", "source": CALL_GRADER}
    call_format = {"type": "json_schema", "json_schema": {"name": "call", "schema": CALL_SHAPE}}
    lines = lines_asking(4, tools=[WEATHER])
    hyper = {**HYPER, "max_completion_tokens": 64}  # the call is 52 bytes, a token each here
    job_id = train_local_model(live_client, live_auth, live_settings, tmp_path, lines, grader, hyper, call_format)
    rows = metric_rows(live_settings, job_id)
    assert all(r["train_reward_mean"] >= 0.5 for r in rows)  # every sample was read as a call
    assert all(r["python_grader_runtime_error_mean"] == 0.0 for r in rows)


def test_tools_on_a_model_whose_template_ignores_them_fail_the_job_naming_the_model(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    grader = {"type": "python", "name": "call", "source": CALL_GRADER}
    lines = [*lines_asking(1), *lines_asking(1, tools=[WEATHER])]
    job_id = train_local_model(
        live_client, live_auth, live_settings, Path("tiny-random-llama"), lines, grader, HYPER, succeed=False
    )
    with unit_of_work(live_settings) as session:
        row = session.scalars(select(Job).where(Job.id == job_id)).one()
    assert row.status == "failed" and row.error is not None
    assert row.error["param"] == "training_file" and row.error["code"] == "invalid_training_file"
    assert "example 2" in row.error["message"] and "'tiny-random-llama'" in row.error["message"]


@pytest.mark.parametrize(
    ("response_format", "param", "words"),
    [
        ({"type": "xml"}, "method.reinforcement.response_format.type", "'json_schema'"),
        (
            {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "nonsense"}}},
            "method.reinforcement.response_format.json_schema.schema",
            "cannot be used to constrain",
        ),
        ({"type": "json_schema", "json_schema": {"schema": REPORT}}, None, "json_schema.name"),
    ],
)
def test_a_response_format_that_cannot_constrain_sampling_is_400_at_creation(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], response_format: Any, param: str, words: str
) -> None:
    body = job_body(*files)
    body["method"]["reinforcement"]["response_format"] = response_format
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"]
    assert error["param"] == (param or "method.reinforcement.response_format.json_schema.name")


@pytest.mark.parametrize(
    ("tools", "words"),
    [
        ({"name": "f"}, "must be a list of tool definitions"),
        ([{"type": "custom", "custom": {"name": "f"}}], "tools[0].type must be 'function'"),
        ([{"type": "function", "function": {"name": "bad name"}}], "tools[0].function.name"),
        ([WEATHER, WEATHER], "tools[1].function.name 'get_weather' is defined twice"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "of type 'object'"),
        ([{"type": "function", "function": {"name": "f", "extra": 1}}], "unknown key(s): extra"),
    ],
)
def test_file_validation_names_the_line_and_the_rule_of_bad_tools(tools: Any, words: str) -> None:
    content = jsonl([*lines_asking(2, tools=[WEATHER]), *lines_asking(1, tools=tools)])
    report = validate_jsonl([content], max_line_bytes=10_000, max_lines=100)
    assert report.error_count == 1
    (line, rule) = report.errors[0]
    assert line == 3 and words in rule, rule


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', "", 1),
        (
            'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
            "Let me look.",
            1,
        ),
        ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", 1),  # Llama 3.1's key
        ('[{"name": "get_weather", "arguments": {}}, {"name": "get_weather", "arguments": "{}"}]', "", 2),
        ('{"name": "get_time", "arguments": {}}', None, 0),  # not one of the tools: text
        ("<tool_call>{not json}</tool_call>", None, 0),
        ("It is sunny.", None, 0),
    ],
)
def test_completions_are_read_as_calls_in_both_documented_forms(text: str, content: str | None, calls: int) -> None:
    sample = Sample.from_completion(text, [WEATHER])
    assert len(sample.output_tools) == calls
    assert sample.output_text == (text if content is None else content)
    for call in sample.output_tools:
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert isinstance(json.loads(call["function"]["arguments"]), dict)
    if calls:
        assert render("{{sample.output_tools[0].function.name}}", sample, {}) == "get_weather"
    assert Sample.from_completion(text, None).output_tools == []  # no tools offered: all text


def test_a_python_grader_sees_output_tools(settings: Settings) -> None:
    grader = parse_grader({"type": "python", "name": "call", "source": CALL_GRADER})
    samples = [
        Sample.from_completion(
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', [WEATHER]
        ),
        Sample.from_completion(
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', [WEATHER]
        ),
        Sample.from_completion("no call", [WEATHER]),
    ]
    with compile_grader(grader, settings) as compiled:
        batch = grade_batch(compiled, samples, [{"city": "Oslo"}] * 3)
    assert batch.rewards == [1.0, 0.5, 0.0]


def test_a_label_model_grader_on_a_random_model_always_answers_a_label(
    client: TestClient, auth: dict[str, str]
) -> None:
    grader: Any = {
        "type": "label_model",
        "name": "verdict",
        "model": "tiny-random-llama",
        "input": [{"role": "user", "content": "Is {{sample.output_text}} right?"}],
        "labels": ["correct", "wrong", "unsure"],
        "passing_labels": ["correct"],
        "sampling_params": {"temperature": 1.0, "seed": 0},
    }
    api = sdk(client, auth)
    for sample in ("a", "bb", "ccc", "dddd"):
        result = api.fine_tuning.alpha.graders.run(grader=grader, model_sample=sample, item={})
        errors = result.metadata.errors.model_dump()
        assert not errors["model_grader_parse_error"], errors
        assert result.reward in (0.0, 1.0)
