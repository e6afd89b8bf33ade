"""Model graders' answers from a rollout engine, inside a training job.

A `score_model` or `label_model` grader asks a model to judge every sampled completion: one
generation per completion per step, as many as the policy's own. In a job, those generations go
through the same engine interface as the policy's (`engine.RolloutEngine`), so a job that samples
with vLLM judges with vLLM too, where vLLM can run the judge model; a judge it cannot run, and every
judge under the torch engine, answers through our own decode loop (`TorchEngine`). The API, which
grades outside any job (`/graders/run`), keeps `model_graders.generate`.

An engine is opened on first use of a judge model and kept for the job; `close` ends them all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from service.core.settings import Settings
from service.graders.model_graders import DEFAULT_MAX_TOKENS, Answer
from service.graders.schemas import SamplingParams
from service.models.constraints import Constraint
from service.models.engines import EngineName
from workers.rl.engine import RolloutEngine, model_problem, open_engine

Opener = Callable[[EngineName, Any, Any, Settings], RolloutEngine]


class EngineJudge:
    """A `model_graders.Judge` that answers through rollout engines of kind `engine`."""

    def __init__(self, engine: EngineName, settings: Settings, opener: Opener = open_engine) -> None:
        self.engine, self.settings, self.opener = engine, settings, opener
        self.engines: dict[tuple[str, bool | None], RolloutEngine] = {}
        self.lock = threading.Lock()  # one generation at a time per job: the engines are not thread-safe

    def __call__(
        self,
        model_name: str,
        conversations: list[list[dict[str, str]]],
        params: SamplingParams | None,
        settings: Settings,
        project_id: str | None,
        constraint: Constraint | None = None,
    ) -> list[Answer]:
        params = params or SamplingParams()
        temperature = params.temperature or 0.0
        with self.lock:
            engine = self.engine_for(model_name, project_id, params.reasoning_effort)
            rollout = engine.sample(
                conversations,
                1,
                max_new_tokens=params.max_completions_tokens or DEFAULT_MAX_TOKENS,
                temperature=temperature if temperature > 0 else 1.0,
                top_p=params.top_p or 1.0,
                seed=params.seed if params.seed is not None else 0,
                greedy=temperature <= 0,
                constraint=constraint,
            )
        prompt_tokens = rollout.attention_mask[:, : rollout.prompt_len].sum(dim=1).tolist()
        completion_tokens = rollout.completion_mask.sum(dim=1).tolist()
        return [
            Answer(text, int(p), int(c))
            for text, p, c in zip(rollout.texts, prompt_tokens, completion_tokens, strict=True)
        ]

    def engine_for(self, model_name: str, project_id: str | None, effort: str | None = None) -> RolloutEngine:
        """The engine judging with `model_name`, one per thinking switch its graders ask for."""
        from service.models import thinking

        key = (model_name, thinking.switch_for(effort))
        if key not in self.engines:
            from service.models.registry import load

            model, tokenizer = load(model_name, self.settings, project_id=project_id)
            tokenizer = thinking.pin(tokenizer, model_name, effort, "sampling_params.reasoning_effort")
            kind: EngineName = self.engine if model_problem(self.engine, model.config) is None else "torch"
            self.engines[key] = self.opener(kind, model, tokenizer, self.settings)
        return self.engines[key]

    def close(self) -> None:
        engines, self.engines = list(self.engines.values()), {}
        for engine in engines:
            engine.close()
