"""`reasoning_effort`, in RFT hyperparameters and in model graders' sampling params: the chat template's
thinking switch where the model has one (service/models/thinking.py), a 400 naming the model where it
has none and the value asks for reasoning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.tables import Checkpoint
from service.models import registry, thinking
from service.models.templates import render_prompt
from tests.conftest import GOOD_LINES, job_body, train_local_model
from tests.support.models import EMPTY_THINK, save_thinking_model

EFFORT = "method.reinforcement.hyperparameters.reasoning_effort"
HELLO = [{"role": "user", "content": "hello"}]


def with_effort(training_file: str, effort: str, model: str = "tiny-random-llama") -> dict[str, Any]:
    body = job_body(training_file, model=model)
    body["method"]["reinforcement"]["hyperparameters"] = {"reasoning_effort": effort}
    return body


def judge(model: str, effort: str | None, content: Any = "Rate {{sample.output_text}} from 0 to 10.") -> dict[str, Any]:
    params: dict[str, Any] = {"max_completions_tokens": 2}
    if effort is not None:
        params["reasoning_effort"] = effort
    return {
        "type": "score_model",
        "name": "judge",
        "model": model,
        "range": [0, 10],
        "input": [{"role": "user", "content": content}],
        "sampling_params": params,
    }


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_effort_on_a_model_without_a_thinking_switch_is_a_400_naming_the_model(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], effort: str
) -> None:
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=with_effort(files[0], effort))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == EFFORT
    assert "'tiny-random-llama'" in error["message"] and "enable_thinking" in error["message"]
    assert "leave it 'default'" in error["message"]


def test_default_effort_is_accepted_on_any_model(
    client: TestClient, auth: dict[str, str], files: tuple[str, str]
) -> None:
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=with_effort(files[0], "default"))
    assert response.status_code == 200, response.text
    assert response.json()["hyperparameters"]["reasoning_effort"] == "default"


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_every_effort_is_accepted_on_a_model_with_the_switch(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], tmp_path: Path, effort: str
) -> None:
    folder = save_thinking_model(tmp_path / "thinker")
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=with_effort(files[0], effort, str(folder)))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("effort", "empty_think"), [("low", True), ("high", False), ("default", False)])
def test_a_job_trains_and_saves_the_model_with_the_switch_its_effort_asks_for(
    live_client: TestClient,
    live_auth: dict[str, str],
    live_settings: Settings,
    tmp_path: Path,
    effort: str,
    empty_think: bool,
) -> None:
    """The policy's tokenizer renders every rollout and is saved with each checkpoint: what chat serves
    and a download holds renders as the rollouts did."""
    from transformers import AutoTokenizer

    folder = save_thinking_model(tmp_path / "thinker")
    grader = {"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": "a"}
    grader["operation"] = "eq"
    hyper = {"reasoning_effort": effort, "n_epochs": 1, "batch_size": 2, "max_completion_tokens": 2, "beta": 0.0}
    job_id = train_local_model(live_client, live_auth, live_settings, folder, GOOD_LINES[:2], grader, hyper)
    with unit_of_work(live_settings) as session:
        key = session.scalars(select(Checkpoint.storage_key).where(Checkpoint.job_id == job_id)).first()
    assert key is not None
    saved = AutoTokenizer.from_pretrained(live_settings.storage_dir / key)
    assert (EMPTY_THINK in render_prompt(saved, HELLO)) is empty_think
    # The template a user gets from a download renders the same without being told the switch.
    assert (EMPTY_THINK in saved.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)) is empty_think


def test_the_policy_renders_its_rollouts_with_the_switch(settings: Settings, tmp_path: Path) -> None:
    from workers.rl.config import resolve
    from workers.rl.policy import build_policy

    folder = save_thinking_model(tmp_path / "thinker")
    for effort, empty_think in (("low", True), ("medium", False)):
        cfg = resolve({"reasoning_effort": effort}, n_train=2)
        _, tokenizer = build_policy(str(folder), cfg, settings, "cpu", seed=0)
        assert (EMPTY_THINK in render_prompt(tokenizer, HELLO)) is empty_think


def test_a_repinned_template_keeps_only_the_last_switch(tmp_path: Path) -> None:
    _, tokenizer = registry.load_fresh(registry.resolve(str(save_thinking_model(tmp_path / "t"))), Settings())
    off = thinking.pin(tokenizer, "t", "low", "p")
    on = thinking.pin(off, "t", "high", "p")
    assert EMPTY_THINK in render_prompt(off, HELLO) and EMPTY_THINK not in render_prompt(on, HELLO)
    assert on.chat_template.count("set enable_thinking") == 1
    assert EMPTY_THINK not in render_prompt(tokenizer, HELLO)  # the original is untouched


@pytest.mark.parametrize("effort", ["none", "minimal", "low", "medium", "high", "xhigh", "max"])
def test_grader_accepts_every_sdk_effort_for_a_judge_with_the_switch(
    client: TestClient, auth: dict[str, str], tmp_path: Path, effort: str
) -> None:
    folder = save_thinking_model(tmp_path / "thinker")
    response = client.post(
        "/v1/fine_tuning/alpha/graders/validate", headers=auth, json={"grader": judge(str(folder), effort)}
    )
    assert response.status_code == 200, response.text
    assert response.json()["grader"]["sampling_params"]["reasoning_effort"] == effort


@pytest.mark.parametrize(("effort", "status"), [("none", 200), ("minimal", 400), ("high", 400), ("max", 400)])
def test_grader_effort_on_a_judge_without_the_switch_is_refused_unless_it_asks_for_nothing(
    client: TestClient, auth: dict[str, str], files: tuple[str, str], effort: str, status: int
) -> None:
    multi = {"type": "multi", "name": "m", "graders": {"j": judge("tiny-random-llama", effort)}}
    multi["calculate_output"] = "j"
    response = client.post("/v1/fine_tuning/alpha/graders/validate", headers=auth, json={"grader": multi})
    assert response.status_code == status, response.text
    body = job_body(files[0])
    body["method"]["reinforcement"]["grader"] = multi
    created = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    assert created.status_code == status, created.text
    if status == 400:
        error = created.json()["error"]
        assert error["param"] == "method.reinforcement.grader.graders.j.sampling_params.reasoning_effort"
        assert "'tiny-random-llama'" in error["message"] and "leave it unset or 'none'" in error["message"]


def test_a_judges_effort_switches_its_thinking_where_the_api_grades(
    client: TestClient, auth: dict[str, str], tmp_path: Path
) -> None:
    """'low' puts the template's empty think block in the judge's prompt, 'high' leaves it out."""
    folder = str(save_thinking_model(tmp_path / "thinker"))

    def prompt_tokens(effort: str) -> int:
        body = {"grader": judge(folder, effort), "model_sample": "x", "item": {}}
        result = client.post("/v1/fine_tuning/alpha/graders/run", headers=auth, json=body)
        assert result.status_code == 200, result.text
        return int(result.json()["model_grader_token_usage_per_model"][folder]["prompt_tokens"])

    # The tiny model's tokenizer is byte-level: one token per character of "<think>\n\n</think>\n\n".
    assert prompt_tokens("low") - prompt_tokens("high") == len(EMPTY_THINK + "\n\n")


def test_a_jobs_judge_switches_its_thinking_as_the_api_does(settings: Settings, tmp_path: Path) -> None:
    from service.graders.model_graders import generate
    from service.graders.schemas import SamplingParams
    from workers.rl.judge import EngineJudge

    folder = str(save_thinking_model(tmp_path / "thinker"))
    conversations = [HELLO]
    engine_judge = EngineJudge("torch", settings)
    try:
        for effort in ("minimal", "max"):
            params = SamplingParams(max_completions_tokens=2, reasoning_effort=effort)  # type: ignore[arg-type]
            assert engine_judge(folder, conversations, params, settings, None) == generate(
                folder, conversations, params, settings
            )
        low = engine_judge(folder, conversations, SamplingParams(reasoning_effort="low"), settings, None)
        high = engine_judge(folder, conversations, SamplingParams(reasoning_effort="high"), settings, None)
    finally:
        engine_judge.close()
    assert low[0].prompt_tokens - high[0].prompt_tokens == len(EMPTY_THINK + "\n\n")
