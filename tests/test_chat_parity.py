"""`/v1/chat/completions` beyond plain text, through the official openai SDK: function tools and
`tool_choice`, tool turns in the history, `response_format` held by constrained decoding,
`logprobs`, `logit_bias` and penalties, and the SDK's other fields (ignored or refused by name).

The model is the random tiny Llama with a tools-capable chat template (the one
`examples/tool_calling/` gives SmolLM2): a random model is the point, since only the constraint
can make its output parse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from service.models.registry import tiny_llama, tiny_tokenizer
from service.models.templates import render_prompt
from tests.support.sdk import sdk

ROOT = Path(__file__).resolve().parent.parent
TOOLS_TEMPLATE = (ROOT / "examples" / "tool_calling" / "chat_template.jinja").read_text()
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Oslo?"}]
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Today's weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Oslo", "Paris"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME: ChatCompletionToolParam = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
ANSWER = {
    "type": "object",
    "properties": {
        "answer": {"type": "integer", "minimum": 0, "maximum": 99},
        "sure": {"type": "boolean"},
        "unit": {"enum": ["C", "F"]},
    },
    "required": ["answer", "sure", "unit"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    model, tokenizer = tiny_llama()
    tokenizer.chat_template = TOOLS_TEMPLATE
    folder = tmp_path_factory.mktemp("tiny-tools")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def arguments_of(call: Any) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(call.function.arguments)
    return parsed


def test_a_named_tool_choice_returns_a_valid_call_of_that_function(
    client: TestClient, auth: dict[str, str], tools_model: str
) -> None:
    answer = sdk(client, auth).chat.completions.create(
        model=tools_model,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_completion_tokens=200,
        n=3,
        seed=1,
    )
    for choice in answer.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        jsonschema.validate(arguments_of(call), WEATHER["function"]["parameters"])  # type: ignore[typeddict-item]


def test_required_without_parallel_calls_makes_exactly_one_call_of_any_tool(
    client: TestClient, auth: dict[str, str], tools_model: str
) -> None:
    answer = sdk(client, auth).chat.completions.create(
        model=tools_model,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_completion_tokens=200,
        n=4,
        seed=3,
    )
    for choice in answer.choices:
        (call,) = choice.message.tool_calls or []
        assert call.function.name in ("get_weather", "get_time")  # type: ignore[union-attr]


def test_streamed_tool_calls_are_the_plain_answers_calls(
    client: TestClient, auth: dict[str, str], tools_model: str
) -> None:
    api = sdk(client, auth)
    asked: dict[str, Any] = {
        "model": tools_model,
        "messages": ASK,
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_completion_tokens": 200,
        "seed": 5,
    }
    plain = api.chat.completions.create(**asked).choices[0]
    chunks = list(api.chat.completions.create(**asked, stream=True))
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert [(c.index, c.function.name, c.function.arguments) for c in calls if c.function] == [
        (0, call.function.name, call.function.arguments)  # type: ignore[union-attr]
        for call in plain.message.tool_calls or []
    ]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_tool_turns_in_the_history_reach_the_template_as_objects(
    client: TestClient, auth: dict[str, str], tools_model: str
) -> None:
    history: list[ChatCompletionMessageParam] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    api = sdk(client, auth)
    answer = api.chat.completions.create(model=tools_model, messages=history, tools=[WEATHER], max_tokens=4)
    short = api.chat.completions.create(model=tools_model, messages=ASK, tools=[WEATHER], max_tokens=4)
    assert answer.usage and short.usage and answer.usage.prompt_tokens > short.usage.prompt_tokens
    _, tokenizer = tiny_llama()
    tokenizer.chat_template = TOOLS_TEMPLATE
    prompt = render_prompt(tokenizer, history, [WEATHER])
    assert '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}' in prompt  # not a quoted string
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt


def test_json_schema_output_of_a_random_model_parses_against_the_schema(
    client: TestClient, auth: dict[str, str]
) -> None:
    answer = sdk(client, auth).chat.completions.create(
        model="tiny-random-llama",
        messages=ASK,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}},
        max_completion_tokens=120,
        n=4,
        seed=11,
    )
    for choice in answer.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), ANSWER)


def test_without_the_constraint_the_same_random_model_writes_no_json(client: TestClient, auth: dict[str, str]) -> None:
    answer = sdk(client, auth).chat.completions.create(
        model="tiny-random-llama", messages=ASK, max_completion_tokens=40, n=4, seed=11
    )
    for choice in answer.choices:
        with pytest.raises(ValueError):
            json.loads(choice.message.content or "")


def test_logprobs_have_openais_shape_and_greedy_picks_the_top_one(client: TestClient, auth: dict[str, str]) -> None:
    answer = sdk(client, auth).chat.completions.create(
        model="tiny-random-llama", messages=ASK, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert answer.usage and len(entries) == answer.usage.completion_tokens == 6
    assert b"".join(bytes(e.bytes or []) for e in entries).decode() == choice.message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob


def test_streamed_logprobs_are_the_plain_answers(client: TestClient, auth: dict[str, str]) -> None:
    api = sdk(client, auth)
    asked: dict[str, Any] = {
        "model": "tiny-random-llama",
        "messages": ASK,
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
        "stop": ["zz"],  # held-back text holds back its tokens' entries too
    }
    plain = api.chat.completions.create(**asked).choices[0].logprobs
    chunks = list(api.chat.completions.create(**asked, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert plain is not None and streamed == plain.content


def test_logit_bias_bans_and_forces_tokens(client: TestClient, auth: dict[str, str]) -> None:
    api = sdk(client, auth)
    tokenizer = tiny_tokenizer()
    plain = api.chat.completions.create(model="tiny-random-llama", messages=ASK, max_tokens=4, temperature=0)
    text = plain.choices[0].message.content or ""
    first = tokenizer(text, add_special_tokens=False)["input_ids"][0]
    banned = api.chat.completions.create(
        model="tiny-random-llama", messages=ASK, max_tokens=4, temperature=0, logit_bias={str(first): -100}
    )
    assert tokenizer(banned.choices[0].message.content or "", add_special_tokens=False)["input_ids"][0] != first
    token_a = tokenizer.convert_tokens_to_ids("a")
    forced = api.chat.completions.create(
        model="tiny-random-llama", messages=ASK, max_tokens=4, temperature=1, seed=0, logit_bias={str(token_a): 100}
    )
    assert forced.choices[0].message.content == "aaaa"


def test_presence_penalty_stops_the_greedy_answer_repeating_itself(client: TestClient, auth: dict[str, str]) -> None:
    api = sdk(client, auth)
    plain = api.chat.completions.create(model="tiny-random-llama", messages=ASK, max_tokens=8, temperature=0)
    penalised = api.chat.completions.create(
        model="tiny-random-llama", messages=ASK, max_tokens=8, temperature=0, presence_penalty=2.0
    )
    repeats = len(plain.choices[0].message.content or "") - len(set(plain.choices[0].message.content or ""))
    assert repeats > 0  # the random model loops on a token, greedily
    text = penalised.choices[0].message.content or ""
    assert len(set(text)) > len(set(plain.choices[0].message.content or ""))


def test_fields_that_change_nothing_locally_are_accepted_and_ignored(client: TestClient, auth: dict[str, str]) -> None:
    api = sdk(client, auth)
    plain = api.chat.completions.create(model="tiny-random-llama", messages=ASK, max_tokens=6, temperature=0)
    dressed = api.chat.completions.create(
        model="tiny-random-llama",
        messages=ASK,
        max_tokens=6,
        temperature=0,
        service_tier="flex",
        store=True,
        prompt_cache_key="k",
        prompt_cache_retention="24h",
        safety_identifier="user-hash",
        metadata={"team": "a"},
        user="someone",
        modalities=["text"],
        parallel_tool_calls=True,
    )
    assert dressed.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "answer in text"),
        ({"modalities": ["text", "audio"]}, "modalities", "only ['text']"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction", "Predicted Outputs"),
        ({"verbosity": "low"}, "verbosity", "not supported"),
        ({"web_search_options": {}}, "web_search_options", "web search"),
        ({"functions": [{"name": "f"}]}, "functions", "'tools'"),
        ({"function_call": "auto"}, "function_call", "'tool_choice'"),
        ({"top_logprobs": 2}, None, "needs logprobs"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"99999": 1}}, "logit_bias", "this model's tokens"),
        ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools", "only kind of tool"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "defined twice"),
        ({"tools": [WEATHER]}, "tools", "does not render tools"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "'json_schema'"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "needs a 'json_schema'"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/no"}}}},
            "response_format.json_schema.schema",
            "cannot be used to constrain",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0", "tool_call_id"),
    ],
)
def test_fields_this_server_cannot_honour_are_400_naming_them(
    client: TestClient, auth: dict[str, str], extra: dict[str, Any], param: str | None, words: str
) -> None:
    body = {"model": "tiny-random-llama", "messages": ASK, "max_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(client, auth).chat.completions.create(**body)
    error: Any = refused.value.body
    assert words in error["message"], error
    if param:
        assert error["param"] == param


def test_a_tool_choice_naming_an_unknown_function_is_400(
    client: TestClient, auth: dict[str, str], tools_model: str
) -> None:
    with pytest.raises(openai.BadRequestError, match="not among the tools") as refused:
        sdk(client, auth).chat.completions.create(
            model=tools_model,
            messages=ASK,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
    assert refused.value.param == "tool_choice"  # type: ignore[attr-defined]
