"""The rollout engine seam: sampling follows the weights it was handed, the sampler's log-probs are
the trainer's where they should be, truncated importance sampling, and the job-level choice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.core.db import unit_of_work
from service.core.settings import Settings
from service.core.tables import Job
from service.models import engines
from service.models.engines import EngineUnavailable, choose_engine, vllm_unavailable
from service.models.sampling import draw
from tests.conftest import job_body, upload
from tests.test_rl import PROMPTS as LINES
from tests.test_rl import job, metrics, run_job
from workers import runner, validate
from workers.rl.config import resolve, with_engine
from workers.rl.engine import TorchEngine
from workers.rl.loss import importance_weights, policy_loss, token_logprobs
from workers.rl.policy import build_policy

PROMPTS = [[{"role": "user", "content": text}] for text in ("hi", "a longer prompt here")]
PARAM = "method.reinforcement.hyperparameters."


def tiny(settings: Settings) -> tuple[Any, Any]:
    return build_policy("tiny-random-llama", resolve({"compute_multiplier": 1}, 2), settings, "cpu", seed=0)


def test_engine_samples_from_the_weights_it_was_handed_and_back(settings: Settings) -> None:
    model, tokenizer = tiny(settings)
    engine = TorchEngine(model, tokenizer)

    def greedy() -> list[str]:
        kw: dict[str, Any] = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": 0}
        return engine.sample(PROMPTS, 1, greedy=True, **kw).texts

    before = greedy()
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    engine.update_weights(model)
    assert greedy() != before
    with torch.no_grad():
        for p, kept in zip(model.parameters(), saved, strict=True):
            p.copy_(kept)
    engine.update_weights(model)
    assert greedy() == before


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (1.0, 0.8), (0.7, 1.0), (0.7, 0.9)])
def test_torch_sampler_logprobs_are_the_trainers_whatever_the_sampling_settings(
    settings: Settings, temperature: float, top_p: float
) -> None:
    """The sampler reports each token's log-prob under the model's own distribution, where the
    trainer scores it, not under the tempered nucleus it drew from: the torch engine's mismatch is
    rounding only, so importance weights divide out engines, never the sampling settings."""
    model, tokenizer = tiny(settings)
    kw: dict[str, Any] = {"max_new_tokens": 8, "temperature": temperature, "top_p": top_p, "seed": 3}
    r = TorchEngine(model, tokenizer).sample(PROMPTS, 4, **kw)
    assert r.sampler_logprobs is not None and r.sampler_logprobs.shape == r.completion_mask.shape
    assert len(r.finish_reasons) == 8 and set(r.finish_reasons) <= {"stop", "length"}
    assert r.finish_reasons == ["length" if t else "stop" for t in r.truncated.tolist()]
    mask = r.completion_mask.float()
    assert bool((r.sampler_logprobs[mask == 0] == 0).all())
    with torch.no_grad():
        trainer, _ = token_logprobs(model, r.input_ids, r.attention_mask, r.prompt_len)
    diff = (trainer - r.sampler_logprobs) * mask
    assert float(diff.abs().sum() / mask.sum()) < 1e-4
    with torch.no_grad():
        weights, capped = importance_weights(trainer, r.sampler_logprobs, mask, "token", 2.0)
    assert float(((weights - 1).abs() * mask).max()) < 1e-3 and not bool(capped.any())


def test_drawn_log_probs_are_of_the_tempered_nucleus_they_were_drawn_from() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    tokens, logp = draw(logits, 0.5, 0.9, torch.Generator().manual_seed(0))
    probs = torch.softmax(logits[0] / 0.5, dim=-1)  # 0.865, 0.117, ...: the nucleus is the first two
    assert set(tokens.tolist()) == {0, 1}
    torch.testing.assert_close(logp, (probs[tokens] / probs[:2].sum()).log())
    greedy_tokens, greedy_logp = draw(logits, 0.0, 0.9, torch.Generator())
    assert set(greedy_tokens.tolist()) == {0} and bool((greedy_logp == 0).all())


def cfg(**hp: Any) -> Any:
    return with_engine(resolve(hp, 4), "vllm", False)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.0]], requires_grad=True)
    sampler = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -3.0, -9.0]])  # ratios e^0.5, e^-1, 1; e^1.9, 1, pad
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return trainer, sampler, mask, torch.tensor([1.0, -0.5])


def test_token_weights_are_the_trainer_to_sampler_ratio_capped() -> None:
    trainer, sampler, mask, _ = batch()
    weights, capped = importance_weights(trainer, sampler, mask, "token", 2.0)
    expected = torch.tensor([[0.5, -1.0, 0.0], [1.9, 0.0, 0.0]]).exp().clamp(max=2.0)
    torch.testing.assert_close(weights, expected)
    assert capped.tolist() == [[False, False, False], [True, False, False]]
    assert not weights.requires_grad


def test_sequence_weights_come_from_the_summed_log_ratio() -> None:
    trainer, sampler, mask, _ = batch()
    weights, capped = importance_weights(trainer, sampler, mask, "sequence", 2.0)
    # Row 0: 0.5 - 1 + 0 = -0.5 (under the cap); row 1: 1.9 + 0 (padding ignored) -> capped at 2.
    torch.testing.assert_close(weights[0], torch.full((3,), float(torch.tensor(-0.5).exp())))
    torch.testing.assert_close(weights[1], torch.full((3,), 2.0))
    assert capped.tolist() == [[False] * 3, [True, True, False]]


def test_correction_weights_the_policy_term_and_none_is_the_old_loss_exactly() -> None:
    trainer, sampler, mask, adv = batch()
    ref = trainer.detach() - 0.3
    plain = policy_loss(trainer, ref, adv, mask, cfg(beta=0.1), 5.0)
    off = policy_loss(trainer, ref, adv, mask, cfg(beta=0.1, importance_sampling_correction="none"), 5.0, sampler)
    assert torch.equal(plain.loss, off.loss) and plain.mismatch is None
    assert off.mismatch is not None and off.mismatch.capped_tokens == 1.0

    token = policy_loss(trainer, None, adv, mask, cfg(beta=0.0), 5.0, sampler)
    weights, _ = importance_weights(trainer, sampler, mask, "token", 2.0)
    # The old policy is the current one (ratio 1): the policy term is -A per token, now times w.
    torch.testing.assert_close(token.loss, -(weights * adv[:, None] * mask).sum() / 5.0)
    (grad,) = torch.autograd.grad(token.loss, trainer)
    torch.testing.assert_close(grad, -(weights * adv[:, None] * mask) / 5.0)


def test_mismatch_sums_are_abs_logp_difference_and_k3_kl() -> None:
    trainer, sampler, mask, adv = batch()
    parts = policy_loss(trainer, None, adv, mask, cfg(), 5.0, sampler)
    delta = torch.tensor([0.5, -1.0, 0.0, 1.9, 0.0])
    assert parts.mismatch is not None
    assert parts.mismatch.abs_logp_diff == pytest.approx(float(delta.abs().sum()))
    assert parts.mismatch.kl == pytest.approx(float((delta.exp() - 1 - delta).sum()), rel=1e-5)
    assert parts.mismatch.kl > 0


def test_auto_correction_is_token_for_another_sampler_and_none_for_the_trainer() -> None:
    assert with_engine(resolve({}, 4), "vllm", False).importance_sampling_correction == "token"
    assert with_engine(resolve({}, 4), "torch", True).importance_sampling_correction == "none"
    forced = resolve({"importance_sampling_correction": "sequence"}, 4)
    assert with_engine(forced, "torch", True).importance_sampling_correction == "sequence"


def test_auto_engine_is_torch_without_vllm_and_vllm_where_usable(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "RFT_VLLM_PYTHON is not set" in str(vllm_unavailable(settings, "tiny-random-llama"))
    assert choose_engine("auto", settings, "tiny-random-llama") == "torch"
    with pytest.raises(EngineUnavailable, match="RFT_VLLM_PYTHON is not set"):
        choose_engine("vllm", settings, "tiny-random-llama")
    with pytest.raises(EngineUnavailable):  # the server's default can ask for it too
        choose_engine("auto", settings.model_copy(update={"rollout_engine": "vllm"}), "tiny-random-llama")
    python = tmp_path / "python"
    python.write_text("")
    with_python = settings.model_copy(update={"vllm_python": str(python)})
    assert vllm_unavailable(with_python, "tiny-random-llama") is None
    monkeypatch.setattr(engines, "VLLM_ENGINE_MODULE", "workers.rl.no_such_engine")  # a build without it
    assert "no vLLM engine" in str(vllm_unavailable(with_python, "tiny-random-llama"))
    monkeypatch.undo()
    assert choose_engine("auto", with_python, "tiny-random-llama") == "vllm"
    assert choose_engine("torch", with_python, "tiny-random-llama") == "torch"


@pytest.mark.parametrize(
    ("hp", "field", "words"),
    [
        ({"rollout_engine": "tgi"}, "rollout_engine", "'auto', 'torch' or 'vllm'"),
        ({"importance_sampling_correction": "tokens"}, "importance_sampling_correction", "'sequence'"),
        ({"importance_sampling_cap": 0.5}, "importance_sampling_cap", "greater than or equal to 1"),
        ({"rollout_engine": "vllm"}, "rollout_engine", "RFT_VLLM_PYTHON is not set"),
    ],
)
def test_bad_engine_extras_are_400_naming_the_field(
    client: TestClient,
    auth: dict[str, str],
    files: tuple[str, str],
    sent_tasks: list[Any],
    hp: dict[str, Any],
    field: str,
    words: str,
) -> None:
    body = job_body(files[0])
    body["method"]["reinforcement"]["hyperparameters"] = hp
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == PARAM + field
    assert words in error["message"]
    assert sent_tasks == []


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_job_echoes_the_engine_and_reports_weight_sync_and_mismatch(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, mode: str
) -> None:
    """The correction forced on for the torch engine: its weights are 1 up to rounding. A cap of 1
    clips the sequences whose rounding leans above 1, and the job still trains."""
    cap = 2.0 if mode == "token" else 1.0
    hyper = {"importance_sampling_correction": mode, "importance_sampling_cap": cap}
    job_id = run_job(live_client, live_auth, live_settings, n_epochs=1, **hyper)
    row = job(live_settings, job_id)
    assert row.status == "succeeded", row.error
    hp = row.method["reinforcement"]["hyperparameters"]
    assert hp["rollout_engine"] == "torch" and hp["importance_sampling_correction"] == mode
    events = live_client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=live_auth, params={"limit": 100})
    (chosen,) = [e for e in events.json()["data"] if e["message"].startswith("Rollout engine: torch")]
    assert "RFT_VLLM_PYTHON is not set" in chosen["message"]
    for m in metrics(live_settings, job_id):
        assert m["timing"]["step"]["weight_sync"] >= 0
        assert 0 <= m["mismatch/mean_abs_logp_diff"] < 1e-4  # fp32 on a CPU, temperature 1: the trainer's
        assert abs(m["mismatch/kl"]) < 1e-4
        capped = m["mismatch/capped_fraction"]
        assert capped == 0 if mode == "token" else 0 < capped < 1


def test_job_asking_for_vllm_on_a_worker_without_it_fails_saying_why(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    """Creation checks the API's host; a worker elsewhere checks again before it loads anything."""
    body = job_body(upload(live_client, live_auth, LINES).json()["id"])
    job_id = live_client.post("/v1/fine_tuning/jobs", headers=live_auth, json=body).json()["id"]
    validate.validate_job(job_id, live_settings)
    with unit_of_work(live_settings) as session:
        row = session.query(Job).filter(Job.id == job_id).one()
        hp = {**row.method["reinforcement"]["hyperparameters"], "rollout_engine": "vllm"}
        row.method = {**row.method, "reinforcement": {**row.method["reinforcement"], "hyperparameters": hp}}
    runner.run_job(job_id, live_settings)
    failed = job(live_settings, job_id)
    assert failed.status == "failed" and failed.error is not None
    assert failed.error["code"] == "rollout_engine_unavailable"
    assert failed.error["param"] == PARAM + "rollout_engine"
    assert "RFT_VLLM_PYTHON is not set" in failed.error["message"]


def test_vllm_holds_the_weights_in_the_type_training_runs_in_unless_told() -> None:
    from workers.rl.vllm_engine import sampling_dtype

    fp32, bf16 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert sampling_dtype(fp32, Settings()) == torch.float32  # CPU, auto: the trainer's fp32
    assert sampling_dtype(fp32, Settings(training_precision="bf16")) == torch.bfloat16
    assert sampling_dtype(bf16, Settings()) == torch.bfloat16
    assert sampling_dtype(fp32, Settings(vllm_dtype="bfloat16")) == torch.bfloat16
    assert sampling_dtype(bf16, Settings(vllm_dtype="float32")) == torch.float32


@pytest.mark.parametrize("lora", [False, True])
def test_the_sidecars_mapping_reads_each_weight_sync_cast_to_vllms_type(
    settings: Settings, tmp_path: Path, lora: bool
) -> None:
    """The worker copies its weights into one shared-memory file per sync; the vLLM side maps the
    same file (`vllm_sidecar.Mapped`, mapped once, before the writes it must see) and must read
    exactly the trainer's weights, LoRA adapters merged, rounded to bf16 as `.to(bfloat16)` does."""
    from workers.rl.vllm_engine import SharedWeights, merged_state, merged_tensors
    from workers.rl.vllm_sidecar import Mapped

    cfg = resolve({"compute_multiplier": 1, **({"lora_rank": 4} if lora else {})}, 2)
    model, _ = build_policy("tiny-random-llama", cfg, settings, "cpu", seed=0)
    shared = SharedWeights(tmp_path / "weights.shared", list(merged_tensors(model)), torch.bfloat16)
    mapped = Mapped(shared.path, shared.layout)
    for round_ in range(2):
        with torch.no_grad():  # a step: every trained tensor moves
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(round_)) * 0.1)
        shared.write(merged_tensors(model))
        expected = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in merged_state(model).items()}
        seen = dict(mapped.tensors)
        assert set(seen) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(seen[name], tensor), f"round {round_}: {name} differs from the trainer's"
    with pytest.raises(RuntimeError, match="the model gave"):
        shared.write(list(merged_tensors(model))[:-1])
