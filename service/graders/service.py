"""The grader playground: validate a config, or run it once on a sample and an item."""

from __future__ import annotations

from typing import Any

from service.core.settings import Settings
from service.graders.engine import compile_grader, grade_batch
from service.graders.schemas import GraderConfig, parse_grader
from service.graders.templates import Sample


def validate(grader: dict[str, Any]) -> GraderConfig:
    return parse_grader(grader, "grader")


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
