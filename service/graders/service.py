"""The grader playground: validate a config, or run it once on a sample and an item."""

from __future__ import annotations

from typing import Any

from service.core.errors import InvalidRequest
from service.core.settings import Settings
from service.graders.engine import compile_grader, grade_batch
from service.graders.isolation import SandboxUnavailable, check_available, grader_environment
from service.graders.sandbox import SandboxLimits
from service.graders.schemas import (
    GraderConfig,
    GraderEnvironmentObject,
    LabelModelGrader,
    MultiGrader,
    ScoreModelGrader,
    parse_grader,
    sub_graders,
)
from service.graders.templates import Sample
from service.models import thinking
from service.models.registry import resolve


def validate(grader: dict[str, Any]) -> GraderConfig:
    config = parse_grader(grader, "grader")
    check_judges(config, "grader")
    return config


def require_runnable(config: GraderConfig, settings: Settings, param: str = "grader") -> None:
    """Refuse (a 400) a grader this server cannot run: a python grader without a sandbox, or a model
    grader asking for reasoning from a judge model known to have no thinking switch."""
    check_judges(config, param)
    subs = list(sub_graders(config).values()) if isinstance(config, MultiGrader) else [config]
    if any(sub.type == "python" for sub in subs):
        try:
            check_available(settings)
        except SandboxUnavailable as exc:
            exc.param = param
            raise


def check_judges(config: GraderConfig, param: str) -> None:
    """Each model grader's `reasoning_effort` against its judge model (service/models/thinking.py)."""
    subs = sub_graders(config) if isinstance(config, MultiGrader) else {"": config}
    for key, sub in subs.items():
        if isinstance(sub, ScoreModelGrader | LabelModelGrader) and sub.sampling_params is not None:
            where = f"{param}.graders.{key}" if key else param
            _check_effort(sub.model, sub.sampling_params.reasoning_effort, f"{where}.sampling_params.reasoning_effort")


def _check_effort(model: str, effort: str | None, param: str) -> None:
    """A judge whose template is on this machine is checked now; others (a `ft:` model, an uncached hub
    id) when the judge loads, failing those samples with the same message."""
    if thinking.asks_for_nothing(effort) or model.startswith("ft:"):
        return
    try:
        spec = resolve(model)
    except InvalidRequest:
        return  # an unknown judge fails its samples with its own message
    thinking.check(model, thinking.has_switch(spec.name, spec.kind, spec.location), effort, param)


def environment(settings: Settings) -> GraderEnvironmentObject:
    """What python graders can import, with versions, and whether this server can run them at all."""
    limits = SandboxLimits()
    sandbox: dict[str, Any] = {
        "available": True,
        "reason": None,
        "mechanism": None,
        "network": False,
        "limits": {
            "timeout_seconds": limits.timeout_s,
            "memory_bytes": limits.memory_bytes,
            "tmp_bytes": limits.tmp_bytes,
            "max_file_bytes": limits.max_file_bytes,
            "max_processes": limits.max_processes,
            "max_open_files": limits.max_open_files,
        },
    }
    python_version, packages = None, []
    try:
        env = grader_environment(settings)
        python_version, packages = env.version, [{"name": n, "version": v} for n, v in env.packages]
        sandbox["mechanism"] = check_available(settings).mechanism
    except SandboxUnavailable as exc:
        sandbox["available"], sandbox["reason"] = False, exc.reason
    return GraderEnvironmentObject.model_validate(
        {"object": "fine_tuning.grader_environment", "python_version": python_version, "packages": packages}
        | {"sandbox": sandbox}
    )


def run(
    grader: dict[str, Any], model_sample: str, item: dict[str, Any] | None, settings: Settings, project_id: str
) -> dict[str, Any]:
    """OpenAI's `/graders/run` answer for one sample."""
    config = parse_grader(grader, "grader")
    with compile_grader(config, settings, project_id) as compiled:
        batch = grade_batch(compiled, [Sample.from_text(model_sample)], [item or {}])
    grade = batch.grades[0]
    token_total = sum(usage["total_tokens"] for usage in grade.token_usage.values())
    models = list(grade.token_usage)
    return {
        "reward": grade.reward,
        "metadata": {
            "name": config.name,
            "type": config.type,
            "execution_time": batch.seconds,
            "scores": {**grade.scores, **{k: v for k, v in grade.details.items() if k != "sub_rewards"}},
            "token_usage": token_total if models else None,
            "sampled_model_name": models[0] if len(models) == 1 else None,
            "errors": grade.error_metadata(),
        },
        "sub_rewards": grade.details.get("sub_rewards", {}),
        "model_grader_token_usage_per_model": grade.token_usage,
    }
