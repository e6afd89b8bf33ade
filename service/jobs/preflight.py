"""The pre-flight: everything job creation checks, the files validated line by line as the job's
validating stage does, and what the job would be, without creating it.

It answers the hyperparameters resolved by the worker's own rules (`workers/rl/config.py`, a
module without torch), the steps and evaluations, the memory plan's lower bound, the tokens it
would train on (counted with the model's tokenizer where its files are here, else estimated:
`service/models/tokens.py`), and a time from the throughput measured on the worker class that would
run it (`service/fleet/throughput.py`), or "no measurement yet".
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from service.auth.service import AuthSubject
from service.core.errors import InvalidRequest
from service.core.settings import Settings
from service.core.storage import Storage
from service.files import repository as files
from service.files.service import check_job_files
from service.fleet.service import can_run
from service.fleet.throughput import JobShape, estimate
from service.jobs.schemas import JobCreate, Preflight, PreflightEstimate, PreflightFile, PreflightTokens
from service.jobs.service import Checked, check_request
from service.models.registry import resolve as resolve_model
from service.models.tokens import estimate as estimate_tokens
from service.models.tokens import prompt_counter
from workers.rl.config import RLConfig, resolve, with_engine


def preflight(
    session: Session, subject: AuthSubject, body: JobCreate, settings: Settings, storage: Storage
) -> Preflight:
    checked = check_request(session, subject, body, settings)
    assert body.method is not None and body.method.reinforcement is not None
    ids = [body.training_file] + ([body.validation_file] if body.validation_file else [])
    rows = {i: files.get(session, subject, i) for i in ids}
    stored = {i: (r.filename, r.sha256, r.storage_key) for i, r in rows.items() if r is not None}
    error, notes = check_job_files(settings, stored, body.training_file, body.validation_file)
    if error is not None:
        raise InvalidRequest(error["message"], param=error["param"], code=error["code"])
    train = _conversations(storage, stored[body.training_file][2])
    valid = _conversations(storage, stored[body.validation_file][2]) if body.validation_file else train
    hyperparameters = body.method.reinforcement.hyperparameters.model_dump(mode="json")
    cfg = with_engine(resolve(hyperparameters, len(train)), checked.engine, checked.engine == "torch")
    evaluations = 1 + sum(
        1 for s in range(1, cfg.total_steps + 1) if s % cfg.eval_interval == 0 or s == cfg.total_steps
    )
    tokens = _tokens(body.model, settings, cfg, train, valid, evaluations)
    shape = JobShape(
        model=body.model,
        mode="lora" if cfg.lora_rank else "full",
        sequences=cfg.batch_size * cfg.group_size,
        eval_sequences=len(valid) * cfg.eval_samples,
        max_completion_tokens=cfg.max_completion_tokens,
    )
    time = estimate(session, shape, cfg.total_steps, evaluations, _devices(checked))
    warnings = [message for _, message in notes] + _warnings(hyperparameters, tokens, time.seconds)
    return Preflight(
        model=body.model,
        training_file=PreflightFile(id=body.training_file, examples=len(train)),
        validation_file=PreflightFile(id=body.validation_file, examples=len(valid)) if body.validation_file else None,
        grader={"type": checked.grader.type, "name": checked.grader.name},
        hyperparameters=cfg.echo() | {k: hyperparameters.get(k) for k in ("max_wall_seconds", "max_tokens")},
        total_steps=cfg.total_steps,
        steps_per_epoch=cfg.steps_per_epoch,
        evaluations=evaluations,
        memory_peak_bytes=checked.plan.peak if checked.plan else None,
        memory_plan=checked.plan.describe() if checked.plan else None,
        tokens=tokens,
        estimate=PreflightEstimate(seconds=time.seconds, device=time.device, basis=time.basis),
        warnings=warnings,
    )


def _conversations(storage: Storage, key: str) -> list[list[dict[str, Any]]]:
    """Each example's messages (the file passed validation, so every non-blank line is one)."""
    text = storage.read_bytes(key).decode("utf-8-sig")
    return [json.loads(line)["messages"] for line in text.splitlines() if line.strip()]


def _tokens(
    model: str, settings: Settings, cfg: RLConfig, train: list[Any], valid: list[Any], evaluations: int
) -> PreflightTokens:
    count, how = prompt_counter(resolve_model(model), settings)
    try:
        train_prompts, valid_prompts = [count(m) for m in train], [count(m) for m in valid]
    except Exception:  # the template refused a conversation: the worker will say why; estimate here
        how, train_prompts, valid_prompts = (
            "estimate",
            [estimate_tokens(m) for m in train],
            [estimate_tokens(m) for m in valid],
        )
    # Each epoch visits every example once (workers/rl/data.py), each prompt sampled group_size times.
    sequences = cfg.n_epochs * len(train) * cfg.group_size
    prompt = cfg.n_epochs * cfg.group_size * sum(train_prompts)
    completion = sequences * cfg.max_completion_tokens
    per_evaluation = cfg.eval_samples * (sum(valid_prompts) + len(valid_prompts) * cfg.max_completion_tokens)
    return PreflightTokens(
        counted_with=how,  # type: ignore[arg-type]
        prompt=prompt,
        completion_at_most=completion,
        trained_at_most=prompt + completion,
        evaluation_at_most=evaluations * per_evaluation,
    )


def _devices(checked: Checked) -> list[str] | None:
    """The device classes of the live workers that could run the job, the router's choice first;
    None where no worker reports itself."""
    if not checked.fleet:
        return None
    needs = checked.plan.peak if checked.plan else None
    fits = [w for w in checked.fleet if can_run(w, needs, None)]
    fits.sort(key=lambda w: (w.current_job_id is not None, w.device_memory_bytes, w.id))  # as `fleet.route`
    return list(dict.fromkeys(w.device_name for w in fits if w.device_name))


def _warnings(hp: dict[str, Any], tokens: PreflightTokens, seconds: float | None) -> list[str]:
    out = []
    if hp.get("max_tokens") is not None and tokens.trained_at_most > hp["max_tokens"]:
        out.append(
            f"max_tokens {hp['max_tokens']:,} is below the {tokens.trained_at_most:,} tokens the job may train on "
            "(completions at max_completion_tokens): it may pause at the cap before its last step."
        )
    if hp.get("max_wall_seconds") is not None and seconds is not None and seconds > hp["max_wall_seconds"]:
        out.append(
            f"max_wall_seconds {hp['max_wall_seconds']:,} is below the estimated {seconds:,.0f} s: the job will "
            "likely pause at the cap before its last step."
        )
    return out
