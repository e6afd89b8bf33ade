"""Grading batches of (sample, item) pairs with any grader config.

`compile_grader(config, settings)` gives an object whose `grade_batch(samples, items)` returns one
`Grade` per pair: the reward, OpenAI's error flags, per-grader scores and sub-rewards. A sample
whose grading fails gets reward 0 and a flag; nothing raises. `BatchGrades` aggregates a batch into
the per-grader metrics a training step publishes. Compiled graders hold resources (a sandbox pool,
a model) and are context managers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.core.settings import Settings
from service.graders import model_graders
from service.graders.formula import Formula
from service.graders.schemas import (
    GraderConfig,
    LabelModelGrader,
    MultiGrader,
    PythonGrader,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
    sub_graders,
)
from service.graders.templates import Sample, TemplateError, render
from service.models.constraints import for_labels

ERROR_FLAGS = (
    "formula_parse_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
    "invalid_variable_error",
    "other_error",
    "python_grader_server_error",
    "python_grader_runtime_error",
    "model_grader_server_error",
    "model_grader_refusal_error",
    "model_grader_parse_error",
)
DETAIL_FLAGS = (
    "python_grader_server_error_type",
    "python_grader_runtime_error_details",
    "model_grader_server_error_details",
)


@dataclass
class Grade:
    reward: float
    errors: dict[str, str] = field(default_factory=dict)  # flag -> detail message
    scores: dict[str, float] = field(default_factory=dict)  # grader name -> its score
    grader_errors: dict[str, list[str]] = field(default_factory=dict)  # grader name -> flags
    token_usage: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> usage
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failed(cls, name: str, flag: str, message: str) -> Grade:
        return cls(0.0, {flag: message}, {name: 0.0}, {name: [flag]})

    def error_metadata(self) -> dict[str, Any]:
        """OpenAI's `metadata.errors`: every flag present, details where there are any."""
        flags: dict[str, Any] = {flag: flag in self.errors for flag in ERROR_FLAGS}
        flags.update({detail: None for detail in DETAIL_FLAGS})
        if "python_grader_runtime_error" in self.errors:
            flags["python_grader_runtime_error_details"] = self.errors["python_grader_runtime_error"]
        if "python_grader_server_error" in self.errors:
            flags["python_grader_server_error_type"] = self.errors["python_grader_server_error"]
        if "model_grader_server_error" in self.errors:
            flags["model_grader_server_error_details"] = self.errors["model_grader_server_error"]
        return flags


class Compiled:
    def __init__(
        self,
        config: GraderConfig,
        settings: Settings,
        project_id: str | None = None,
        judge: model_graders.Judge | None = None,
    ) -> None:
        # project_id: whose fine-tuned models (`ft:...`) a model grader may use.
        # judge: what answers a model grader's prompts (`model_graders.generate` unless a worker's engine).
        self.config, self.settings, self.project_id = config, settings, project_id
        self.judge = judge or model_graders.generate
        self.name, self.type = config.name, config.type

    def grade_batch(self, samples: Sequence[Sample], items: Sequence[dict[str, Any]]) -> list[Grade]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Compiled:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _render_all(
        self, templates: Sequence[str], samples: Sequence[Sample], items: Sequence[dict[str, Any]]
    ) -> list[list[str] | Grade]:
        """Rendered templates per pair, or the failed Grade of a pair whose template did not resolve."""
        out: list[list[str] | Grade] = []
        for sample, item in zip(samples, items, strict=True):
            try:
                out.append([render(t, sample, item) for t in templates])
            except TemplateError as exc:
                out.append(Grade.failed(self.name, exc.kind, str(exc)))
        return out


class StringCheck(Compiled):
    config: StringCheckGrader

    def grade_batch(self, samples: Sequence[Sample], items: Sequence[dict[str, Any]]) -> list[Grade]:
        op = self.config.operation
        grades = []
        for rendered in self._render_all([self.config.input, self.config.reference], samples, items):
            if isinstance(rendered, Grade):
                grades.append(rendered)
                continue
            text, ref = rendered
            hit = {"eq": text == ref, "ne": text != ref, "like": ref in text, "ilike": ref.lower() in text.lower()}[op]
            grades.append(Grade(float(hit), scores={self.name: float(hit)}))
        return grades


class TextSimilarity(Compiled):
    config: TextSimilarityGrader

    def grade_batch(self, samples: Sequence[Sample], items: Sequence[dict[str, Any]]) -> list[Grade]:
        from service.graders.similarity import similarity_many

        rendered = self._render_all([self.config.input, self.config.reference], samples, items)
        pairs = [(r[0], r[1]) for r in rendered if not isinstance(r, Grade)]
        try:
            values = iter(similarity_many(self.config.evaluation_metric, pairs))
        except Exception as exc:  # a missing optional package, say: every pair of the batch fails alike
            message = f"{self.config.evaluation_metric}: {type(exc).__name__}: {exc}"
            return [r if isinstance(r, Grade) else Grade.failed(self.name, "other_error", message) for r in rendered]
        grades = []
        threshold = self.config.pass_threshold
        for r in rendered:
            if isinstance(r, Grade):
                grades.append(r)
                continue
            similarity = next(values)
            reward = similarity if threshold is None else float(similarity >= threshold)
            grades.append(Grade(reward, scores={self.name: reward}, details={"similarity": similarity}))
        return grades


class Python(Compiled):
    config: PythonGrader

    def __init__(
        self,
        config: PythonGrader,
        settings: Settings,
        project_id: str | None = None,
        judge: model_graders.Judge | None = None,
        *,
        pool_size: int | None = None,
    ) -> None:
        super().__init__(config, settings, project_id, judge)
        from service.graders.isolation import check_available
        from service.graders.sandbox import PythonGraderPool

        # SandboxUnavailable (a 400, or the failed job's error) rather than grades that could never succeed.
        self.pool = PythonGraderPool(config.source, size=pool_size, isolation=check_available(settings))

    def grade_batch(self, samples: Sequence[Sample], items: Sequence[dict[str, Any]]) -> list[Grade]:
        outcomes = self.pool.grade_many([(s.as_dict(), i) for s, i in zip(samples, items, strict=True)])
        grades = []
        for outcome in outcomes:
            if outcome.error_type or outcome.score is None:
                grades.append(
                    Grade.failed(
                        self.name, outcome.error_type or "python_grader_server_error", outcome.error or "no score"
                    )
                )
            else:
                grades.append(Grade(outcome.score, scores={self.name: outcome.score}))
        return grades

    def close(self) -> None:
        self.pool.close()


class ModelGrader(Compiled):
    config: ScoreModelGrader | LabelModelGrader

    def grade_batch(self, samples: Sequence[Sample], items: Sequence[dict[str, Any]]) -> list[Grade]:
        messages = self.config.input
        rendered = self._render_all([m.text() for m in messages], samples, items)
        conversations = [
            [
                {"role": "system" if m.role == "developer" else m.role, "content": text}
                for m, text in zip(messages, r, strict=True)
            ]
            for r in rendered
            if not isinstance(r, Grade)
        ]
        labels = for_labels(self.config.labels) if isinstance(self.config, LabelModelGrader) else None
        try:
            answers = iter(
                self.judge(
                    self.config.model,
                    conversations,
                    self.config.sampling_params,
                    self.settings,
                    self.project_id,
                    labels,
                )
                if conversations
                else []
            )
        except Exception as exc:
            message = f"grader model {self.config.model!r} failed: {type(exc).__name__}: {exc}"
            return [
                r if isinstance(r, Grade) else Grade.failed(self.name, "model_grader_server_error", message)
                for r in rendered
            ]
        return [r if isinstance(r, Grade) else self._judge(next(answers)) for r in rendered]

    def _judge(self, answer: model_graders.Answer) -> Grade:
        usage = {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
            "cached_tokens": 0,
        }
        if isinstance(self.config, ScoreModelGrader):
            value, flag = model_graders.parse_score(answer.text, self.config)
            details: dict[str, Any] = {"answer": answer.text}
        else:
            label, flag = model_graders.parse_label(answer.text, self.config)
            value = None if label is None else float(label in self.config.passing_labels)
            details = {"answer": answer.text, "label": label}
        if flag or value is None:
            grade = Grade.failed(
                self.name,
                flag or "model_grader_parse_error",
                f"could not read a {'score' if self.type == 'score_model' else 'label'} "
                f"from the grader model's answer {answer.text[:200]!r}",
            )
        else:
            grade = Grade(value, scores={self.name: value})
        grade.token_usage, grade.details = {self.config.model: usage}, details
        return grade


class Multi(Compiled):
    config: MultiGrader

    def __init__(
        self,
        config: MultiGrader,
        settings: Settings,
        project_id: str | None = None,
        judge: model_graders.Judge | None = None,
    ) -> None:
        super().__init__(config, settings, project_id, judge)
        self.formula = Formula(config.calculate_output, set(config.graders))
        self.subs = {
            key: compile_grader(sub, settings, project_id, self.judge) for key, sub in sub_graders(config).items()
        }

    def grade_batch(self, samples: Sequence[Sample], items: Sequence[dict[str, Any]]) -> list[Grade]:
        per_key = {key: sub.grade_batch(samples, items) for key, sub in self.subs.items()}
        grades = []
        for i in range(len(samples)):
            parts = {key: per_key[key][i] for key in self.subs}
            grade = Grade(0.0)
            for key, part in parts.items():
                grade.errors.update(part.errors)
                grade.scores[key] = part.reward
                if part.errors:
                    grade.grader_errors[key] = list(part.errors)
                for model, usage in part.token_usage.items():
                    total = grade.token_usage.setdefault(model, dict.fromkeys(usage, 0))
                    for k, v in usage.items():
                        total[k] += v
            try:
                grade.reward = self.formula.evaluate({k: p.reward for k, p in parts.items()})
            except (ArithmeticError, ValueError) as exc:
                grade.errors["other_error"] = f"calculate_output failed: {type(exc).__name__}: {exc}"
            grade.details["sub_rewards"] = dict(grade.scores)
            grades.append(grade)
        return grades

    def close(self) -> None:
        for sub in self.subs.values():
            sub.close()


def compile_grader(
    config: GraderConfig,
    settings: Settings,
    project_id: str | None = None,
    judge: model_graders.Judge | None = None,
) -> Compiled:
    """The grader `config` describes; its model graders answer through `judge` where one is given
    (a training job's rollout engine, `workers.rl.judge`), else through `model_graders.generate`."""
    if isinstance(config, StringCheckGrader):
        return StringCheck(config, settings, project_id, judge)
    if isinstance(config, TextSimilarityGrader):
        return TextSimilarity(config, settings, project_id, judge)
    if isinstance(config, PythonGrader):
        return Python(config, settings, project_id, judge)
    if isinstance(config, ScoreModelGrader | LabelModelGrader):
        return ModelGrader(config, settings, project_id, judge)
    return Multi(config, settings, project_id, judge)


@dataclass
class BatchGrades:
    """A training step's grades, and the per-grader metrics OpenAI publishes for it."""

    grades: list[Grade]
    grader_types: dict[str, str]
    seconds: float

    @property
    def rewards(self) -> list[float]:
        return [g.reward for g in self.grades]

    def grader_means(self) -> dict[str, float]:
        return {name: _mean([g.scores.get(name, 0.0) for g in self.grades]) for name in self.grader_types}

    def error_rates(self) -> dict[str, float]:
        """`<flag>_mean` over the batch, OpenAI's per-error-type rates."""
        return {f"{flag}_mean": _mean([float(flag in g.errors) for g in self.grades]) for flag in ERROR_FLAGS}

    def error_counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {name: {} for name in self.grader_types}
        for grade in self.grades:
            for name, flags in grade.grader_errors.items():
                for flag in flags:
                    counts.setdefault(name, {})[flag] = counts.setdefault(name, {}).get(flag, 0) + 1
        return counts


def grader_types(compiled: Compiled) -> dict[str, str]:
    if isinstance(compiled, Multi):
        return {key: sub.type for key, sub in compiled.subs.items()}
    return {compiled.name: compiled.type}


def grade_batch(compiled: Compiled, samples: Sequence[Sample], items: Sequence[dict[str, Any]]) -> BatchGrades:
    started = time.perf_counter()
    grades = compiled.grade_batch(samples, items)
    for grade in grades:
        if not math.isfinite(grade.reward):
            grade.errors.setdefault("other_error", f"non-finite reward {grade.reward}")
            grade.reward = 0.0
    return BatchGrades(grades, grader_types(compiled), time.perf_counter() - started)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
