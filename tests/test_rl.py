"""The RL loop on a tiny random Llama: it learns a learnable task, every loss variant runs, and a
paused-and-resumed run ends with exactly the weights and metrics of an uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy import select

from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.tables import Checkpoint, Job, JobMetric
from tests.conftest import set_job_flags, submit, upload
from workers import runner, validate
from workers.rl import engine as engine_module
from workers.rl import loop as loop_module
from workers.rl.data import batch_for_step
from workers.rl.loss import advantages
from workers.rl.policy import autocast_dtype

# Dense reward a random byte-level model can climb: the share of lowercase ASCII letters it writes.
LOWERCASE = """
def grade(sample, item):
    text = sample["output_text"]
    return sum(c.isascii() and c.islower() for c in text) / max(1, len(text))
"""
PROMPTS = b"".join(
    json.dumps({"messages": [{"role": "user", "content": f"write {i}"}]}).encode() + b"\n" for i in range(4)
)


def run_job(client: TestClient, auth: dict[str, str], settings: Settings, **hyper: Any) -> str:
    file_id = upload(client, auth, PROMPTS).json()["id"]
    hp = {
        "batch_size": 4,
        "compute_multiplier": 2,
        "max_completion_tokens": 8,
        "eval_samples": 4,
        "beta": 0.0,
        "mask_truncated_completions": False,
        "learning_rate_multiplier": 3000,
        "n_epochs": 4,
        **hyper,
    }
    body = {
        "model": "tiny-random-llama",
        "training_file": file_id,
        "seed": 11,
        "method": {
            "type": "reinforcement",
            "reinforcement": {
                "grader": {"type": "python", "name": "lower", "source": LOWERCASE},
                "hyperparameters": hp,
            },
        },
    }
    job_id = submit(client, auth, settings, body)
    runner.run_job(job_id, settings)
    return job_id


def replay_with_pause(client: TestClient, auth: dict[str, str], settings: Settings, done: Job) -> str:
    """Run `done`'s job again (same model, seed, method, data), paused after step 1 and resumed."""
    file_id = upload(client, auth, PROMPTS, "again.jsonl").json()["id"]
    body = {"model": done.model, "training_file": file_id, "seed": done.seed, "method": done.method}
    job_id = str(client.post("/v1/fine_tuning/jobs", headers=auth, json=body).json()["id"])
    validate.validate_job(job_id, settings)
    set_job_flags(settings, job_id, pause_requested=True)
    runner.run_job(job_id, settings)
    assert job(settings, job_id).status == "paused"
    assert [m["step"] for m in metrics(settings, job_id)] == [1]
    client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth)
    runner.run_job(job_id, settings)
    assert job(settings, job_id).status == "succeeded"
    return job_id


def metrics(settings: Settings, job_id: str) -> list[dict[str, Any]]:
    with unit_of_work(settings) as session:
        rows = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.step)).all()
        return [r.data for r in rows]


def final_weights(settings: Settings, job_id: str) -> dict[str, torch.Tensor]:
    """The newest checkpoint's trained weights: the full model, or the adapters under LoRA."""
    with unit_of_work(settings) as session:
        key = session.scalars(
            select(Checkpoint.storage_key).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step_number.desc())
        ).first()
    assert key is not None
    folder = settings.storage_dir / key
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(folder / name))


def job(settings: Settings, job_id: str) -> Job:
    with unit_of_work(settings) as session:
        return session.scalars(select(Job).where(Job.id == job_id)).one()


def test_loop_learns_a_learnable_task_and_picks_the_best_checkpoint(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    job_id = run_job(live_client, live_auth, live_settings, n_epochs=8)
    row = job(live_settings, job_id)
    assert row.status == "succeeded", row.error
    history = metrics(live_settings, job_id)
    assert [m["step"] for m in history] == list(range(1, 9))
    assert history[-1]["train_reward_mean"] > history[0]["train_reward_mean"] + 0.3
    events = live_client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=live_auth, params={"limit": 100}).json()[
        "data"
    ]
    final = next(e for e in events if e["message"].startswith("Final model"))
    assert final["data"]["beat_baseline"] is True
    assert final["data"]["chosen"]["valid_reward_mean"] > final["data"]["baseline_valid_reward"]
    assert row.fine_tuned_model is not None
    assert row.fine_tuned_model.endswith(f"ckpt-step-{final['data']['chosen_step']}")
    assert row.method["reinforcement"]["hyperparameters"]["n_epochs"] == 8


@pytest.mark.parametrize(("precision", "lora_rank"), [("bf16", 0), ("bf16", 4), ("auto", 0)])
def test_training_precision_sets_the_autocast_of_sampling_and_update(
    live_client: TestClient,
    live_auth: dict[str, str],
    live_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    precision: str,
    lora_rank: int,
) -> None:
    """bf16 is the CUDA default; RFT_TRAINING_PRECISION=bf16 runs the same autocast path on a CPU."""
    seen: list[tuple[str, bool, torch.dtype]] = []
    weight_types: set[tuple[bool, torch.dtype]] = set()  # (trained, dtype) of the policy's parameters

    def spy(module: Any, name: str) -> None:
        original = getattr(module, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            seen.append((name, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            if name == "token_logprobs":
                weight_types.update((p.requires_grad, p.dtype) for p in args[0].parameters())
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    spy(engine_module, "sample")  # what the torch engine samples with
    spy(loop_module, "token_logprobs")
    chosen = live_settings.model_copy(update={"training_precision": precision})
    job_id = run_job(live_client, live_auth, chosen, n_epochs=4 if lora_rank else 8, beta=0.05, lora_rank=lora_rank)
    assert job(chosen, job_id).status == "succeeded", job(chosen, job_id).error
    assert {name for name, _, _ in seen} == {"sample", "token_logprobs"}
    if precision == "bf16":
        assert all(enabled and dtype == torch.bfloat16 for _, enabled, dtype in seen)
    else:  # auto on a CPU: full precision
        assert not any(enabled for _, enabled, _ in seen)
    history = metrics(chosen, job_id)
    assert all(m["kl"] is not None and m["kl"] >= 0 and m["grad_norm"] is not None for m in history)
    weights = final_weights(chosen, job_id)
    assert all(t.dtype == torch.float32 for t in weights.values())  # master weights stay fp32
    if lora_rank and precision == "bf16":  # the frozen base is held in bf16, the adapters in fp32
        assert weight_types == {(False, torch.bfloat16), (True, torch.float32)}
    else:
        assert {dtype for _, dtype in weight_types} == {torch.float32}
    if lora_rank:  # the adapters' B matrices start at zero: the update moved them
        assert any("lora_B" in name and bool(t.abs().sum() > 0) for name, t in weights.items())
    else:
        assert history[-1]["train_reward_mean"] > history[0]["train_reward_mean"] + 0.2


def test_autocast_dtype_is_bf16_on_cuda_by_default_and_wherever_asked_for() -> None:
    assert autocast_dtype("auto", "cuda") == torch.bfloat16
    assert autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16
    assert autocast_dtype("fp32", "cuda") is None


@pytest.mark.parametrize(
    "variant",
    [
        {"importance_sampling": "sequence"},
        {"beta": 0.1, "kl_estimator": "k1"},
        {"beta": 0.1, "kl_estimator": "k3"},
        {"advantage_std": "batch"},
        {"advantage_std": "none"},
        {"loss_aggregation": "sequence_mean"},
        {"mask_truncated_completions": True},
        {"micro_batch_size": 3, "warmup_steps": 2},
    ],
)
def test_every_loss_variant_trains(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, variant: dict[str, Any]
) -> None:
    job_id = run_job(live_client, live_auth, live_settings, n_epochs=2, **variant)
    assert job(live_settings, job_id).status == "succeeded", job(live_settings, job_id).error
    history = metrics(live_settings, job_id)
    assert len(history) == 2
    if variant.get("beta"):
        assert history[-1]["valid_kl"] is not None and history[-1]["valid_kl"] >= 0


def test_paused_and_resumed_run_equals_the_uninterrupted_run(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    straight = run_job(live_client, live_auth, live_settings, beta=0.05)
    interrupted = replay_with_pause(live_client, live_auth, live_settings, job(live_settings, straight))
    a, b = final_weights(live_settings, straight), final_weights(live_settings, interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = {"timing", "tokens_per_second"}
    clean = [
        [{k: v for k, v in m.items() if k not in drop} for m in metrics(live_settings, j)]
        for j in (straight, interrupted)
    ]
    assert clean[0] == clean[1]


def test_group_relative_advantages_and_zero_variance_groups() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    adv, zero = advantages(rewards, 4, "group")
    assert zero.tolist() == [False, True]
    assert torch.allclose(adv[4:], torch.zeros(4))
    assert adv[0] > 0 > adv[1]
    plain, _ = advantages(rewards, 4, "none")
    assert torch.allclose(plain[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]), atol=1e-3)


def test_data_order_is_a_function_of_seed_and_step() -> None:
    epoch = [batch_for_step(10, 4, step, seed=3) for step in range(3)]
    assert sorted(i for batch in epoch for i in batch) == list(range(10))
    assert batch_for_step(10, 4, 1, seed=3) == epoch[1]
    assert batch_for_step(10, 4, 3, seed=3) != epoch[0] or batch_for_step(10, 4, 4, seed=3) != epoch[1]


def test_every_use_of_the_seed_gets_its_own_seed() -> None:
    """Evaluation once drew with training step 7919's seed; named uses never collide."""
    from workers.rl.state import derive_seed

    training = {derive_seed(5, "train", step) for step in range(1, 20_001)}
    refills = {derive_seed(5, "refill", step, r) for step in range(1, 2_001) for r in (1, 2)}
    assert len(training) == 20_000 and len(refills) == 4_000 and not training & refills
    assert derive_seed(5, "eval") not in training | refills
    assert derive_seed(5, "train", 3) == derive_seed(5, "train", 3) != derive_seed(6, "train", 3)
    assert all(0 <= s < 2**31 for s in training)
    # stable across processes and versions (no salted hash): a resumed job draws what it drew before
    assert derive_seed(42, "train", 1) == 1618102271


def test_trainer_state_round_trips_and_reads_checkpoints_of_the_untyped_state() -> None:
    from workers.rl.state import GuardState, TrainerState

    state = TrainerState(3, {"reward": 0.5}, [{"step": 3, "valid_reward_mean": 0.6}], None, GuardState([1.0], 1, 0.5))
    assert TrainerState.from_dict(state.to_dict()) == state
    old = {  # trainer_state.pt's "state" as written before TrainerState
        "step": 4,
        "baseline": {"reward": 0.1},
        "evals": [{"step": 2, "valid_reward_mean": 0.2}],
        "resumed_at": 2,
        "guard": {"grad_norms": [0.3, 0.4], "rollbacks": 2, "lr_scale": 0.25, "entropy0": 1.5},
    }
    restored = TrainerState.from_dict(old)
    assert restored.to_dict() == old
    assert restored.guard.lr_scale == 0.25 and restored.evals[0]["step"] == 2


def test_a_jobs_model_grader_judges_through_the_jobs_rollout_engine(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.rl import judge as judge_module

    calls: list[tuple[str, int]] = []
    real = judge_module.EngineJudge.__call__

    def spy(self: Any, model_name: str, conversations: Any, *rest: Any) -> Any:
        calls.append((self.engine, len(conversations)))
        return real(self, model_name, conversations, *rest)

    monkeypatch.setattr(judge_module.EngineJudge, "__call__", spy)
    grader = {
        "type": "score_model",
        "name": "judge",
        "model": "tiny-random-llama",
        "range": [0, 1],
        "input": [{"role": "user", "content": "rate {{sample.output_text}}"}],
        "sampling_params": {"max_completions_tokens": 2},
    }
    file_id = upload(live_client, live_auth, PROMPTS).json()["id"]
    body = {
        "model": "tiny-random-llama",
        "training_file": file_id,
        "method": {
            "type": "reinforcement",
            "reinforcement": {
                "grader": grader,
                "hyperparameters": {"n_epochs": 1, "batch_size": 2, "max_completion_tokens": 4},
            },
        },
    }
    created = live_client.post("/v1/fine_tuning/jobs", headers=live_auth, json=body)
    assert created.status_code == 200, created.text
    validate.validate_job(created.json()["id"], live_settings)
    runner.run_job(created.json()["id"], live_settings)
    row = job(live_settings, created.json()["id"])
    assert row.status == "succeeded", row.error
    assert calls and {engine for engine, _ in calls} == {"torch"}
    assert (calls[1][1]) == 2 * 4  # a training step: batch 2 x group 4 completions, one judgement each


def test_model_graders_can_use_the_projects_fine_tuned_model_and_nobody_elses(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    from service.auth.service import create_api_key

    job_id = run_job(live_client, live_auth, live_settings, n_epochs=1)
    name = job(live_settings, job_id).fine_tuned_model
    grader = {
        "type": "score_model",
        "name": "ft-judge",
        "model": name,
        "range": [0, 1],
        "input": [{"role": "user", "content": "rate {{sample.output_text}}"}],
        "sampling_params": {"max_completions_tokens": 4},
    }
    body = {"grader": grader, "model_sample": "hello", "item": {}}
    mine = live_client.post("/v1/fine_tuning/alpha/graders/run", headers=live_auth, json=body).json()
    assert mine["metadata"]["sampled_model_name"] == name
    assert mine["model_grader_token_usage_per_model"][name]["completion_tokens"] > 0
    assert mine["metadata"]["errors"]["model_grader_server_error"] is False
    with unit_of_work(live_settings) as session:
        _, other_key = create_api_key(session, live_settings, "other")
    theirs = live_client.post(
        "/v1/fine_tuning/alpha/graders/run", headers={"Authorization": f"Bearer {other_key}"}, json=body
    ).json()
    assert theirs["reward"] == 0.0
    assert theirs["metadata"]["errors"]["model_grader_server_error"] is True
    assert "No fine-tuned model or checkpoint" in theirs["metadata"]["errors"]["model_grader_server_error_details"]


def inject(monkeypatch: pytest.MonkeyPatch, bad: Any) -> None:
    """Replace the gradient norm of the calls `bad(call_number)` picks with the value it returns."""
    from workers.rl import loop

    real, calls = loop.clip_gradients, {"n": 0}

    def fake(*args: Any) -> float:  # (model, max_norm, ranks)
        calls["n"] += 1
        value = real(*args)
        injected = bad(calls["n"])
        return value if injected is None else injected

    monkeypatch.setattr(loop, "clip_gradients", fake)


def warn_messages(client: TestClient, auth: dict[str, str], job_id: str) -> list[str]:
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=auth, params={"limit": 200}).json()["data"]
    return [e["message"] for e in events if e["level"] == "warn"]


def test_nan_gradient_is_skipped_rolled_back_and_halves_the_learning_rate(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject(monkeypatch, lambda n: float("nan") if n == 3 else None)
    job_id = run_job(live_client, live_auth, live_settings, eval_interval=1)
    assert job(live_settings, job_id).status == "succeeded"
    history = metrics(live_settings, job_id)
    assert [m["update_skipped"] for m in history] == [False, False, True, False]
    assert history[3]["lr"] == pytest.approx(history[0]["lr"] / 2)
    assert any(
        "non-finite" in m and "rolled back to the checkpoint at step 2" in m
        for m in warn_messages(live_client, live_auth, job_id)
    )


def test_persistent_instability_fails_the_job_after_bounded_rollbacks(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject(monkeypatch, lambda n: float("inf"))
    job_id = run_job(live_client, live_auth, live_settings, n_epochs=8)
    row = job(live_settings, job_id)
    assert row.status == "failed" and row.error is not None
    assert row.error["code"] == "training_unstable" and "3 rollbacks" in row.error["message"]
    rollbacks = [m for m in warn_messages(live_client, live_auth, job_id) if "rolled back" in m]
    assert len(rollbacks) == 3 and any("the base weights" in m for m in rollbacks)


def test_gradient_norm_spike_is_refused(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    inject(monkeypatch, lambda n: 1e6 if n == 7 else None)
    job_id = run_job(live_client, live_auth, live_settings, n_epochs=8)
    assert job(live_settings, job_id).status == "succeeded"
    assert [m["update_skipped"] for m in metrics(live_settings, job_id)].count(True) == 1
    assert any("gradient norm spike" in m for m in warn_messages(live_client, live_auth, job_id))


def test_kl_runaway_raises_a_warning(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    job_id = run_job(live_client, live_auth, live_settings, n_epochs=2, beta=0.1, kl_limit=1e-9)
    assert any("above kl_limit" in m for m in warn_messages(live_client, live_auth, job_id))


def test_only_the_latest_and_best_three_checkpoints_are_kept(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    job_id = run_job(live_client, live_auth, live_settings, n_epochs=8, eval_interval=1)
    row = job(live_settings, job_id)
    with unit_of_work(live_settings) as session:
        kept = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
        steps = {c.step_number for c in kept}
        keys = {c.storage_key for c in kept}
    assert 8 in steps and len(steps) <= 4
    assert row.fine_tuned_model is not None and any(row.fine_tuned_model.endswith(f"ckpt-step-{s}") for s in steps)
    folder = live_settings.storage_dir / "checkpoints" / row.project_id / job_id
    assert {f"checkpoints/{row.project_id}/{job_id}/{p.name}" for p in folder.iterdir()} == keys


def test_lora_trains_adapters_only_resumes_exactly_and_serves_as_a_grader_model(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    lora = {"lora_rank": 4, "beta": 0.05, "learning_rate_multiplier": 300}
    straight = run_job(live_client, live_auth, live_settings, **lora)
    row = job(live_settings, straight)
    assert row.status == "succeeded", row.error
    weights = final_weights(live_settings, straight)
    assert weights and all("lora_" in name for name in weights)
    history = metrics(live_settings, straight)
    assert history[-1]["valid_kl"] is not None  # the reference is the base with adapters disabled
    again = replay_with_pause(live_client, live_auth, live_settings, row)
    resumed = final_weights(live_settings, again)
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
    grader = {
        "type": "score_model",
        "name": "j",
        "model": row.fine_tuned_model,
        "range": [0, 1],
        "input": [{"role": "user", "content": "{{sample.output_text}}"}],
        "sampling_params": {"max_completions_tokens": 2},
    }
    ran = live_client.post(
        "/v1/fine_tuning/alpha/graders/run", headers=live_auth, json={"grader": grader, "model_sample": "x"}
    ).json()
    assert ran["metadata"]["errors"]["model_grader_server_error"] is False, ran["metadata"]["errors"][
        "model_grader_server_error_details"
    ]


def test_groups_without_reward_variance_are_refilled_with_fresh_prompts(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    flat_or_lowercase = LOWERCASE.replace(
        '    text = sample["output_text"]',
        '    if item.get("flat"):\n        return 0.5\n    text = sample["output_text"]',
    )
    lines = [{"messages": [{"role": "user", "content": f"p{i}"}], "flat": i < 6} for i in range(12)]
    file_id = upload(live_client, live_auth, b"".join(json.dumps(x).encode() + b"\n" for x in lines)).json()["id"]
    hp = {
        "batch_size": 4,
        "compute_multiplier": 1,
        "max_completion_tokens": 6,
        "n_epochs": 2,
        "beta": 0.0,
        "mask_truncated_completions": False,
        "refill_rounds": 2,
    }
    body = {
        "model": "tiny-random-llama",
        "training_file": file_id,
        "seed": 3,
        "method": {
            "type": "reinforcement",
            "reinforcement": {
                "grader": {"type": "python", "name": "g", "source": flat_or_lowercase},
                "hyperparameters": hp,
            },
        },
    }
    job_id = live_client.post("/v1/fine_tuning/jobs", headers=live_auth, json=body).json()["id"]
    validate.validate_job(job_id, live_settings)
    runner.run_job(job_id, live_settings)
    assert job(live_settings, job_id).status == "succeeded"
    history = metrics(live_settings, job_id)
    assert sum(m["refilled_groups"] for m in history) > 0
    assert all(m["frac_zero_std_groups_after_refill"] <= m["frac_zero_std_groups"] for m in history)
    assert any(m["frac_zero_std_groups_after_refill"] < m["frac_zero_std_groups"] for m in history)
    # The reported train reward is the step's own prompts'; what was trained on after refill is apart.
    assert all(m["trained_reward_mean"] == m["train_reward_mean"] for m in history if not m["refilled_groups"])
    assert any(m["trained_reward_mean"] != m["train_reward_mean"] for m in history if m["refilled_groups"])


def test_greedy_validation_gives_one_answer_per_prompt(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    job_id = run_job(live_client, live_auth, live_settings, n_epochs=1, eval_samples=2, eval_temperature=0)
    assert job(live_settings, job_id).method["reinforcement"]["hyperparameters"]["eval_temperature"] == 0
    evaluated = [m for m in metrics(live_settings, job_id) if m.get("valid_samples")]
    assert evaluated
    for m in evaluated:
        samples = m["valid_samples"]
        pairs = [(samples[i], samples[i + 1]) for i in range(0, len(samples) - 1, 2)]
        assert pairs and all(a["prompt"] == b["prompt"] and a["completion"] == b["completion"] for a, b in pairs)
        assert all(set(s["scores"]) == {"lower"} for s in samples)
        (grader,) = m["scores"]["graders"]
        assert grader["valid_reward_mean"] == pytest.approx(m["valid_reward_mean"])


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_pass_gives_the_same_logprobs_and_gradients(settings: Settings, lora: bool) -> None:
    from workers.rl import loss
    from workers.rl.config import resolve
    from workers.rl.policy import build_policy
    from workers.rl.rollout import prompt_owners, sample

    cfg = resolve({"lora_rank": 4 if lora else 0, "compute_multiplier": 1}, 3)
    model, tokenizer = build_policy("tiny-random-llama", cfg, settings, "cpu", seed=0)
    prompts = [[{"role": "user", "content": text}] for text in ("hi", "a longer prompt here", "x")]
    r = sample(model, tokenizer, prompts, 4, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=1)
    rows = torch.tensor([1, 2, 3, 4, 5, 8, 11])  # runs of 3, 2 and 2 rows sharing a prompt
    ids, attn, mask = r.input_ids[rows], r.attention_mask[rows], r.completion_mask[rows]
    firsts, owner = prompt_owners(ids, attn, r.prompt_len)
    assert firsts.tolist() == [0, 3, 5] and owner.tolist() == [0, 0, 0, 1, 1, 2, 2]

    def run(batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        outs = [loss.token_logprobs(model, ids[b], attn[b], r.prompt_len) for b in batches]
        logp, entropy = torch.cat([o[0] for o in outs]) * mask, torch.cat([o[1] for o in outs]) * mask
        logp.sum().backward()
        return logp, entropy, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    shared = run([torch.arange(len(rows))])
    alone = run([torch.tensor([i]) for i in range(len(rows))])  # one row a pass: nothing shared
    torch.testing.assert_close(shared[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[1], alone[1], rtol=1e-5, atol=1e-5)
    assert shared[2] and len(shared[2]) == len(alone[2])
    for a, b in zip(alone[2], shared[2], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_update_over_samplings_prompt_pass_gives_the_gradients_of_running_the_prompts_again(
    settings: Settings, lora: bool
) -> None:
    """Sampling keeps its prompt pass; the update runs only the completions over it, in micro-batches
    that split a group, after a refill-like concat (prompts re-padded) and row selection."""
    from workers.rl import loss
    from workers.rl.config import resolve
    from workers.rl.policy import build_policy, has_dropout
    from workers.rl.rollout import PrefixGrads, concat, sample, select_rows

    cfg = resolve({"lora_rank": 4 if lora else 0, "compute_multiplier": 1}, 3)
    model, tokenizer = build_policy("tiny-random-llama", cfg, settings, "cpu", seed=0)
    assert not has_dropout(model)

    def draw(texts: tuple[str, ...], seed: int) -> Any:
        prompts = [[{"role": "user", "content": text}] for text in texts]
        return sample(
            model, tokenizer, prompts, 4, max_new_tokens=6, temperature=1.0, top_p=1.0, seed=seed, keep_prefix=True
        )

    first, extra = draw(("hi", "a much longer prompt than the others"), 1), draw(("x",), 2)
    assert first.prompt_len > extra.prompt_len  # the extra prefix is padded on the left by concat
    r = select_rows(concat(first, extra, tokenizer.pad_token_id), [0, 1, 2, 3, 8, 9, 10, 11])
    assert r.prefix is not None and r.prefix.owner.tolist() == [0, 0, 0, 0, 2, 2, 2, 2]
    batches = [torch.arange(0, 6), torch.arange(6, 8)]

    def run(reuse: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        prefix = PrefixGrads(r.prefix) if reuse and r.prefix is not None else None
        logps = []
        for b in batches:
            shared = prefix.rows(b) if prefix is not None else None
            logp, _ = loss.token_logprobs(model, r.input_ids[b], r.attention_mask[b], r.prompt_len, shared)
            (logp * r.completion_mask[b]).sum().backward()
            logps.append(logp.detach() * r.completion_mask[b])
        if prefix is not None:
            prefix.backward()
        return torch.cat(logps), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    reused, again = run(True), run(False)
    torch.testing.assert_close(reused[0], again[0], rtol=1e-5, atol=1e-5)
    assert reused[1] and len(reused[1]) == len(again[1])
    for a, b in zip(again[1], reused[1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_dropout_turns_off_reuse_of_samplings_prompt_pass(settings: Settings) -> None:
    from workers.rl.config import resolve
    from workers.rl.policy import build_policy, has_dropout

    cfg = resolve({"lora_rank": 4, "lora_dropout": 0.1, "compute_multiplier": 1}, 3)
    assert has_dropout(build_policy("tiny-random-llama", cfg, settings, "cpu", seed=0)[0])


def test_lora_adapters_depend_on_the_seed_not_on_what_loading_drew(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first load of the GGUF model converts it and draws random numbers; a cached load does not.
    The same job seed must give the same adapters either way."""
    from workers.rl import policy
    from workers.rl.config import resolve

    cfg = resolve({"lora_rank": 4, "compute_multiplier": 1}, 3)

    def adapters(seed: int) -> dict[str, torch.Tensor]:
        model = policy.build_policy("tiny-random-llama", cfg, settings, "cpu", seed=seed)[0]
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    plain = adapters(1)
    load = policy.load_fresh

    def converting_load(*args: object, **kwargs: object) -> tuple[object, object]:
        torch.rand(1000)  # as a first-time conversion does
        return load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(policy, "load_fresh", converting_load)
    after_draws = adapters(1)
    assert plain and plain.keys() == after_draws.keys()
    assert all(torch.equal(plain[n], after_draws[n]) for n in plain)
    assert not torch.equal(next(iter(adapters(2).values())), next(iter(plain.values())))


def test_update_skips_rows_and_columns_that_carry_no_loss() -> None:
    from workers.rl.loop import live_part

    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    rows, width = live_part(mask, torch.arange(0, 4))
    assert rows.tolist() == [0, 2] and width == 3
    rows, width = live_part(mask, torch.arange(3, 5))
    assert rows.tolist() == [4] and width == 1
    assert live_part(mask, torch.tensor([1]))[0].numel() == 0


def test_micro_batches_take_the_groups_with_the_longest_answers_first_each_group_whole() -> None:
    from workers.rl.loop import live_part, longest_first

    lengths = [2, 1, 9, 3, 1, 1, 7, 0]  # four groups of two rows: longest 2, 9, 1, 7
    mask = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths])
    order = longest_first(mask, range(0, 8), 2)
    assert order.tolist() == [2, 3, 6, 7, 0, 1, 4, 5]
    widths = [live_part(mask, order[k : k + 4])[1] for k in (0, 4)]
    assert widths == [9, 2]  # in row order both micro-batches would run 9 wide
    assert longest_first(mask, range(4, 8), 2).tolist() == [6, 7, 4, 5]  # a rank's share: its own rows


def test_greedy_rollouts_give_the_tokens_plain_generate_gives(settings: Settings) -> None:
    """Our decode loop (shared prompt cache, one token per row a step, pad after EOS) against
    transformers' `generate`, on prompts of different lengths."""
    from service.models import registry
    from workers.rl.rollout import sample

    model, tokenizer = registry.load_fresh(registry.resolve("tiny-random-llama"), settings)
    prompts = [[{"role": "user", "content": text}] for text in ("hi", "a longer prompt here", "x")]
    ours = sample(model, tokenizer, prompts, 2, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=3, greedy=True)
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    enc = tokenizer([t for t in texts for _ in range(2)], return_tensors="pt", padding=True, add_special_tokens=False)
    plain = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    completions = plain[:, enc["input_ids"].shape[1] :]
    assert completions.shape == ours.completion_mask.shape
    assert torch.equal(
        completions[ours.completion_mask.bool()],
        ours.input_ids[:, ours.prompt_len :][ours.completion_mask.bool()],
    )


def test_sampled_rollouts_follow_the_seed(settings: Settings) -> None:
    from service.models import registry
    from workers.rl.rollout import sample

    model, tokenizer = registry.load_fresh(registry.resolve("tiny-random-llama"), settings)
    prompts = [[{"role": "user", "content": text}] for text in ("hi", "a longer prompt here")]

    def draw(seed: int) -> torch.Tensor:
        return sample(model, tokenizer, prompts, 4, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=seed).input_ids

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_token_draws_follow_temperature_and_the_top_p_nucleus() -> None:
    """The inverse-CDF draw against the distribution it must sample, 200,000 rows at a time."""
    from service.models.sampling import pick

    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.log().expand(200_000, 4).contiguous()
    generator = torch.Generator().manual_seed(0)

    def frequencies(temperature: float, top_p: float) -> torch.Tensor:
        return torch.bincount(pick(logits, temperature, top_p, generator), minlength=4) / logits.shape[0]

    torch.testing.assert_close(frequencies(1.0, 1.0), probs, atol=5e-3, rtol=0)
    sharpened = probs**2 / (probs**2).sum()  # temperature 0.5
    torch.testing.assert_close(frequencies(0.5, 1.0), sharpened, atol=5e-3, rtol=0)
    nucleus = torch.tensor([0.0, 0.0, 2 / 3, 1 / 3])  # 0.6 + 0.3 is the smallest set reaching 0.65
    torch.testing.assert_close(frequencies(1.0, 0.65), nucleus, atol=5e-3, rtol=0)
    assert pick(logits[:3], 0.0, 1.0, generator).tolist() == [2, 2, 2]  # temperature 0: greedy


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_training_process_takes_large_tensors_from_the_reusable_heap() -> None:
    """By default glibc maps a 128 MiB tensor afresh and unmaps it on free, so the kernel zero-fills
    its pages again at every step; the training process takes it from the heap, which keeps them."""
    script = """
import sys, torch
from workers.rl.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
t = torch.empty(32 << 20)
maps = [line.split() for line in open("/proc/self/maps")]
heap = [tuple(int(x, 16) for x in m[0].split("-")) for m in maps if m[-1] == "[heap]"]
print(any(lo <= t.data_ptr() < hi for lo, hi in heap))
"""

    def in_heap(mode: str) -> bool:
        done = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        return done.stdout.strip() == "True"

    assert not in_heap("default")
    assert in_heap("keep")
