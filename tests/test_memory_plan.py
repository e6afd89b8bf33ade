"""The memory planner: its parameter counts are torch's, its estimates are within 15% of the
measured peak of real jobs at three configurations (135M and 0.5B parameters, full and LoRA), the
API refuses a job no worker can hold (naming what it needs), and the worker picks a micro-batch and
gradient checkpointing that fit, or fails clearly."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoConfig, AutoModelForCausalLM

from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.tables import JobEvent
from service.models import memory_plan
from service.models.memory_plan import GIB, Shape, Workload, estimate, fit
from tests.test_rl import job, run_job
from workers.rl import chunked

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import memory_planner  # noqa: E402  (bench/, run as a script there)

TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 24},
    "mistral": {},
    "gemma": {"head_dim": 32},
    "gemma2": {"head_dim": 32},
    "gemma3_text": {"head_dim": 32},
    "phi3": {},
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_parameter_count_is_torchs(model_type: str) -> None:
    config = AutoConfig.for_model(model_type, **TINY_SHAPE, **FAMILIES[model_type])
    model = AutoModelForCausalLM.from_config(config)
    assert Shape.from_config(config.to_dict()).params == sum(p.numel() for p in model.parameters())


def test_adapter_count_is_peft_trainable_count() -> None:
    from peft import LoraConfig, get_peft_model

    config = AutoConfig.for_model("qwen2", **TINY_SHAPE)
    shape = Shape.from_config(config.to_dict())
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=8, target_modules=targets))
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert shape.adapter_params(8, targets) == trained, targets


def test_mixture_of_experts_is_not_counted_rather_than_miscounted() -> None:
    with pytest.raises(ValueError, match="mixture-of-experts"):
        Shape.from_config({**TINY_SHAPE, "model_type": "qwen2_moe", "num_experts": 8})


def test_the_planners_chunking_is_the_workers() -> None:
    assert memory_plan.CHUNK_BYTES == chunked.CHUNK_BYTES
    assert memory_plan.CHUNKED_TYPES == chunked.CHUNKED_TYPES


@pytest.mark.parametrize("case", memory_planner.TESTED)
def test_estimate_is_within_15_percent_of_the_measured_peak(case: str, tmp_path: Path) -> None:
    """A real job in a fresh worker process (bench/memory_planner.py): VmHWM against the plan."""
    result = memory_planner.measure(memory_planner.CASES[case], tmp_path)
    error = result["estimated"] / result["measured"] - 1
    assert abs(error) <= 0.15, (case, error, result["plan"]["parts"], result["where"])


def qwen2_05b_folder(root: Path) -> Path:
    """A local model folder with nothing but Qwen2-0.5B's config: the API plans from the config alone."""
    folder = root / "qwen2-0.5b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(memory_planner.QWEN2_05B))
    return folder


def job_body(model: str, file_id: str, **hyper: Any) -> dict[str, Any]:
    grader = {"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": "a"}
    grader["operation"] = "eq"
    return {
        "model": model,
        "training_file": file_id,
        "method": {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hyper}},
    }


def test_api_refuses_a_job_no_worker_can_hold_and_says_what_it_needs(
    client: TestClient, auth: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    from tests.conftest import upload

    model = str(qwen2_05b_folder(tmp_path))
    file_id = upload(client, auth, b'{"messages": [{"role": "user", "content": "hi"}]}\n').json()["id"]
    settings.worker_memory_gib = 6
    refused = client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(model, file_id))
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "job_too_large"
    assert error["param"] == "method.reinforcement.hyperparameters"
    # full fine-tuning of 494M parameters: fp32 weights, gradients, two moments and the reference
    assert "weights 1.84 GiB" in error["message"] and "reference 1.84 GiB" in error["message"]
    assert "6.00 GiB" in error["message"] and "lora_rank" in error["message"]
    # the advice works: LoRA adapters of the same model fit the same worker
    fits = client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(model, file_id, lora_rank=16))
    assert fits.status_code == 200, fits.text
    # and a worker with enough memory takes the full fine-tuning
    settings.worker_memory_gib = 16
    assert client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(model, file_id)).status_code == 200


def test_full_fine_tuning_on_several_devices_plans_one_ranks_share(
    client: TestClient, auth: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    from tests.conftest import upload

    shape = Shape.from_config(memory_planner.QWEN2_05B)
    one = Workload(8, 4, 64, 64, 8, False, device="cuda")
    four = estimate(shape, replace(one, devices=4, sharded=True))
    whole = estimate(shape, one)
    layers = shape.layers * shape.layer_params
    for part in ("weights", "gradients", "optimizer", "reference"):  # a quarter of the layers, all the embeddings
        assert whole.parts[part] - four.parts[part] == pytest.approx(whole.parts[part] * 3 / 4 * layers / shape.params)
    assert four.parts["gathered_weights"] == pytest.approx(4 * 3 / 4 * layers, abs=4)  # whole while sampling
    assert four.parts["kv_cache"] == pytest.approx(whole.parts["kv_cache"] / 4)  # 2 of the 8 prompts
    lora = replace(one, lora_rank=8)  # data parallel: every rank holds the whole model
    assert estimate(shape, replace(lora, devices=4)).parts["weights"] == estimate(shape, lora).parts["weights"]

    model = str(qwen2_05b_folder(tmp_path))
    file_id = upload(client, auth, b'{"messages": [{"role": "user", "content": "hi"}]}\n').json()["id"]
    # 13 GiB a device (90%: 11.7): too little for the whole model's training state on one (11.79
    # GiB), enough for a quarter of it on each of four (11.62), barely: on a CPU rank 0 gathers the
    # whole weights and moments to write a checkpoint (5.5 GiB), and the heap keeps what the update,
    # sampling and that gather each took (the estimate adds them up there)
    settings.worker_memory_gib = 13
    assert client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(model, file_id)).status_code == 400
    spread = client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(model, file_id, n_devices=4))
    assert spread.status_code == 200, spread.text


def test_hub_models_are_planned_from_the_local_hugging_face_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    snapshot = tmp_path / "models--acme--big" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(memory_planner.QWEN2_05B))
    (tmp_path / "models--acme--big" / "refs").mkdir()
    (tmp_path / "models--acme--big" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    shape = memory_plan.shape_of("acme/big")
    assert shape is not None and shape.params == 494_032_768
    assert memory_plan.shape_of("acme/not-downloaded") is None  # unknown here: its worker plans it


def tight(shape: Shape, work: Workload, fits: Workload, misses: Workload) -> int:
    """A budget that `fits` fits and `misses` does not."""
    low, high = estimate(shape, fits).peak, estimate(shape, misses).peak
    assert low < high
    return int((low + high) / 2 / memory_plan.HEADROOM)


def test_fit_halves_the_micro_batch_then_turns_on_checkpointing() -> None:
    shape = Shape.from_config(memory_planner.SMOLLM2_135M)
    work = Workload(8, 8, 64, 256, 64, False, lora_rank=8)
    smaller = replace(work, micro_batch_size=16)
    budget = tight(shape, work, smaller, replace(work, micro_batch_size=32))
    chosen = fit(shape, work, budget, micro_batch_auto=True, checkpointing_auto=True)
    assert (chosen.workload.micro_batch_size, chosen.workload.gradient_checkpointing) == (16, False)
    one = replace(work, micro_batch_size=1)
    budget = tight(shape, work, replace(one, gradient_checkpointing=True, keeps_prefix=False), one)
    chosen = fit(shape, work, budget, micro_batch_auto=True, checkpointing_auto=True)
    assert chosen.workload.gradient_checkpointing and not chosen.workload.keeps_prefix
    assert chosen.peak <= memory_plan.HEADROOM * budget
    # what the job fixed stays fixed: no checkpointing allowed means no plan fits
    with pytest.raises(memory_plan.InvalidRequest, match="micro_batch_size 1, gradient checkpointing off"):
        fit(shape, work, budget, micro_batch_auto=True, checkpointing_auto=False)


def plan_event(settings: Settings, job_id: str) -> dict[str, Any]:
    from sqlalchemy import select

    with unit_of_work(settings) as session:
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
        plans = [dict(e.data or {}) for e in events if e.message.startswith("Memory plan")]
        assert plans, (
            [(e.level, e.message) for e in events],
            job(settings, job_id).status,
            job(settings, job_id).error,
        )
        return plans[-1]


def test_worker_plans_a_smaller_micro_batch_under_a_tight_budget_and_echoes_it(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    roomy = run_job(live_client, live_auth, live_settings, max_completion_tokens=64, n_epochs=1)
    planned = plan_event(live_settings, roomy)
    assert planned["micro_batch_size"] == 16 and planned["gradient_checkpointing"] is False  # auto: 2 groups
    full = planned["peak"]
    # a budget that holds the job at micro-batch 8 (one group) but not 16
    work = Workload(4, 8, planned["prompt_tokens"], 64, 16, False, beta=0.0, keeps_prefix=True)
    shape = Shape.from_config(memory_plan.BUILTIN_CONFIGS["tiny-random-llama"])
    budget = tight(shape, work, replace(work, micro_batch_size=8), work)
    assert budget < full / memory_plan.HEADROOM
    live_settings.worker_memory_gib = budget / GIB
    tight_job = run_job(live_client, live_auth, live_settings, max_completion_tokens=64, n_epochs=1)
    planned = plan_event(live_settings, tight_job)
    assert planned["micro_batch_size"] == 8
    assert job(live_settings, tight_job).status == "succeeded"
    echoed = job(live_settings, tight_job).method["reinforcement"]["hyperparameters"]
    assert echoed["micro_batch_size"] == 8 and echoed["gradient_checkpointing"] is False
    # tighter still, for LoRA: not even one sequence fits without checkpointing, so the worker turns it on
    lora = replace(work, lora_rank=4)
    one = replace(lora, micro_batch_size=1)
    budget = tight(shape, lora, replace(one, gradient_checkpointing=True, keeps_prefix=False), one)
    live_settings.worker_memory_gib = budget / GIB
    checkpointed = run_job(live_client, live_auth, live_settings, max_completion_tokens=64, n_epochs=1, lora_rank=4)
    assert job(live_settings, checkpointed).status == "succeeded", job(live_settings, checkpointed).error
    assert plan_event(live_settings, checkpointed)["gradient_checkpointing"] is True
    echoed = job(live_settings, checkpointed).method["reinforcement"]["hyperparameters"]
    assert echoed["gradient_checkpointing"] is True


def test_worker_fails_clearly_when_the_real_prompts_cannot_fit(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    """The API plans one-token prompts; the worker, which tokenizes them, finds they cannot fit."""
    shape = Shape.from_config(memory_plan.BUILTIN_CONFIGS["tiny-random-llama"])
    fixed = {"micro_batch_size": 32, "gradient_checkpointing": False}
    from service.models.registry import tiny_tokenizer
    from service.models.templates import render_prompt

    tokenizer = tiny_tokenizer()
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "write 0"}])
    api = Workload(4, 8, 1, 64, 32, False, beta=0.0, keeps_prefix=False)
    real = replace(api, prompt_tokens=len(tokenizer(prompt)["input_ids"]), keeps_prefix=True)
    live_settings.worker_memory_gib = tight(shape, api, api, real) / GIB
    job_id = run_job(live_client, live_auth, live_settings, max_completion_tokens=64, n_epochs=1, **fixed)
    failed = job(live_settings, job_id)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error["code"] == "job_too_large"
    assert "micro_batch_size 32, gradient checkpointing off" in failed.error["message"]
    assert "To fit:" in failed.error["message"]


def test_cuda_budget_is_the_gpus_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.rl import plan

    class Props:
        total_memory = 80 * GIB

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props() if index == 1 else None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # rank 1's GPU, on a worker with several
    assert plan.device_memory(Settings(), "cuda") == 80 * GIB
    assert plan.device_memory(Settings(worker_memory_gib=24), "cuda") == 24 * GIB
