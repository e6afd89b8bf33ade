"""`/v1/models` and `/v1/chat/completions` through the official openai SDK: base and fine-tuned
models, greedy answers equal to transformers' own, streaming, stop strings, seeds and errors."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from service.core import db
from service.core.settings import Settings
from service.models import registry
from tests.conftest import make_key
from tests.support.procs import Proc, free_port, printed_api_key, wait_healthy
from tests.support.sdk import sdk
from tests.test_rl import job, run_job

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]


def test_chat_completion_has_openai_shape(client: TestClient, auth: dict[str, str]) -> None:
    answer = sdk(client, auth).chat.completions.create(
        model="tiny-random-llama",
        messages=HELLO,
        max_tokens=6,
        temperature=0,
    )
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.model == "tiny-random-llama"
    (choice,) = answer.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    if choice.finish_reason == "length":
        assert answer.usage.completion_tokens == 6


def test_fine_tuned_model_answers_like_its_download_in_transformers(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job_id = run_job(live_client, live_auth, live_settings, n_epochs=2)
    name = job(live_settings, job_id).fine_tuned_model
    assert name is not None
    client = sdk(live_client, live_auth)
    assert name in {m.id for m in client.models.list()}
    assert client.models.retrieve(name).owned_by == job(live_settings, job_id).project_id

    answer = client.chat.completions.create(model=name, messages=HELLO, max_completion_tokens=12, temperature=0)
    archive = live_client.get(f"/v1/fine_tuning/jobs/{job_id}/content", headers=live_auth).content
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(tmp_path, filter="data")
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.choices[0].message.content == expected


def test_stream_yields_the_same_text_as_a_plain_answer(client: TestClient, auth: dict[str, str]) -> None:
    api = sdk(client, auth)
    plain = api.chat.completions.create(model="tiny-random-llama", messages=HELLO, max_tokens=10, temperature=0)
    chunks: list[ChatCompletionChunk] = list(
        api.chat.completions.create(
            model="tiny-random-llama",
            messages=HELLO,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_seeded_sampling_repeats_and_n_gives_several_choices(client: TestClient, auth: dict[str, str]) -> None:
    api = sdk(client, auth)

    def ask(seed: int) -> list[str | None]:
        answer = api.chat.completions.create(
            model="tiny-random-llama",
            messages=HELLO,
            max_tokens=8,
            n=3,
            seed=seed,
            temperature=1.0,
            top_p=0.9,
        )
        assert [c.index for c in answer.choices] == [0, 1, 2]
        return [c.message.content for c in answer.choices]

    first = ask(7)
    assert ask(7) == first
    assert len(set(first)) > 1 or ask(8) != first


def test_stop_string_ends_the_answer_and_is_not_returned(client: TestClient, auth: dict[str, str]) -> None:
    api = sdk(client, auth)
    free = api.chat.completions.create(model="tiny-random-llama", messages=HELLO, max_tokens=12, temperature=0)
    text = free.choices[0].message.content or ""
    assert len(text) > 3, text
    stop = text[2:4]
    cut = api.chat.completions.create(
        model="tiny-random-llama",
        messages=HELLO,
        max_tokens=12,
        temperature=0,
        stop=[stop],
    )
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = api.chat.completions.create(
        model="tiny-random-llama",
        messages=HELLO,
        max_tokens=12,
        temperature=0,
        stop=stop,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.find(stop)]


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"model": "no-such-model"}, "model", "Unknown model"),
        ({"model": "ft:tiny-random-llama:other:x:abc"}, "model", "No fine-tuned model"),
        ({"max_tokens": 100_000}, "max_tokens", "only"),
        ({"frequency_penalty": 3}, "frequency_penalty", "less than or equal to 2"),
        ({"reasoning_effort": "low"}, "reasoning_effort", "no reasoning mode"),
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        ({"messages": []}, "messages", "at least 1"),
        ({"bogus": 1}, "bogus", "Unrecognized request argument"),
    ],
)
def test_bad_chat_requests_name_the_field(
    client: TestClient, auth: dict[str, str], extra: dict[str, object], param: str | None, words: str
) -> None:
    body = {"model": "tiny-random-llama", "messages": HELLO, **extra}
    response = client.post("/v1/chat/completions", headers=auth, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"]
    if param:
        assert error["param"] == param


def test_fine_tuned_models_of_another_project_are_invisible(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    job_id = run_job(live_client, live_auth, live_settings, n_epochs=1)
    name = job(live_settings, job_id).fine_tuned_model
    with db.unit_of_work(live_settings) as session:
        other = sdk(live_client, make_key(session, live_settings, "other"))
    assert name not in {m.id for m in other.models.list()}
    assert "tiny-random-llama" in {m.id for m in other.models.list()}
    with pytest.raises(openai.NotFoundError):
        other.models.retrieve(str(name))
    with pytest.raises(openai.BadRequestError, match="No fine-tuned model"):
        other.chat.completions.create(model=str(name), messages=HELLO)


def test_loaded_models_are_bounded(settings: Settings) -> None:
    bounded = settings.model_copy(update={"max_loaded_models": 1})
    registry._cache.clear()
    first, _ = registry.load("tiny-random-llama", bounded)
    assert registry.load("tiny-random-llama", bounded)[0] is first  # cached
    registry.load(str(_saved_tiny(settings.data_dir)), bounded)
    assert len(registry._cache) == 1
    assert registry.load("tiny-random-llama", bounded)[0] is not first  # evicted, loaded again


def _saved_tiny(root: Path) -> Path:
    model, tokenizer = registry.load_fresh(registry.resolve("tiny-random-llama"), Settings())
    folder = root / "tiny-copy"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_streamed_chat_over_http_leaves_the_server_responsive(tmp_path: Path) -> None:
    """A long generation runs in the thread pool: /health answers at once while tokens stream."""
    import httpx

    port = free_port()
    env = {"RFT_DATA_DIR": str(tmp_path / "data"), "RFT_DATABASE_URL": "", "RFT_BROKER_URL": ""}
    serve = Proc(["serve", "--port", str(port), "--no-workers"], env, tmp_path / "serve.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, serve)
        key = printed_api_key(serve)
        api = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        stream = api.chat.completions.create(
            model="tiny-random-llama", messages=HELLO, max_tokens=900, temperature=0, stream=True
        )
        chunks = iter(stream)
        next(chunks)
        waits = []
        for _ in range(5):
            t0 = time.perf_counter()
            assert httpx.get(f"{base}/health", timeout=5).status_code == 200
            waits.append(time.perf_counter() - t0)
        rest = list(chunks)
        assert rest and rest[-1].choices[0].finish_reason in ("stop", "length")
        assert max(waits) < 0.5, waits
    finally:
        serve.stop()
