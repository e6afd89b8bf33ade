"""An RFT job's output formats: `method.reinforcement.response_format` and the data's `tools`.

`response_format` (`json_schema` or `json_object`, checked when the job was created) holds every
completion the job samples, in training and in evaluation, to its grammar (`formatted`), through
whichever rollout engine the job runs: our decode loop masks the logits with llguidance, vLLM takes
the same grammar as a structured output. `{{sample.output_json}}` is then the parsed object.

Lines that carry `tools` are rendered with them by the model's chat template; a model whose
template ignores tools could never see them, so the job fails before training, naming the model
and the first such line (`check_tools`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from service.core.errors import InvalidRequest
from service.models.constraints import Constraint, from_response_format
from service.models.tools import supports_tools
from workers.rl.data import Example
from workers.rl.engine import RolloutEngine
from workers.rl.rollout import Rollout

PARAM = "method.reinforcement.response_format"


class Formatted:
    """`engine`, every completion of which follows `constraint` (unless a call brings its own)."""

    def __init__(self, engine: RolloutEngine, constraint: Constraint) -> None:
        self.engine, self.constraint = engine, constraint
        self.name, self.same_as_trainer = engine.name, engine.same_as_trainer

    def sample(
        self,
        conversations: list[list[dict[str, Any]]],
        n: int,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        first: int = 0,
        greedy: bool = False,
        keep_prefix: bool = False,
        tools: Sequence[Sequence[Mapping[str, Any]] | None] | None = None,
        constraint: Constraint | None = None,
    ) -> Rollout:
        return self.engine.sample(
            conversations,
            n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            first=first,
            greedy=greedy,
            keep_prefix=keep_prefix,
            tools=tools,
            constraint=constraint or self.constraint,
        )

    def update_weights(self, model: Any) -> None:
        self.engine.update_weights(model)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def close(self) -> None:
        self.engine.close()


def formatted(engine: RolloutEngine, response_format: Mapping[str, Any] | None) -> RolloutEngine:
    """`engine`, held to the job's `response_format` where it has one."""
    constraint = from_response_format(response_format, PARAM)
    return engine if constraint is None else Formatted(engine, constraint)


def check_tools(tokenizer: Any, model_name: str, train: list[Example], valid: list[Example]) -> None:
    """A clear failure where lines carry `tools` that the model's chat template would not render."""
    for param, examples in (("training_file", train), ("validation_file", valid)):
        first = next((i for i, e in enumerate(examples, start=1) if e.item.get("tools")), None)
        if first is not None and not supports_tools(tokenizer):
            error = InvalidRequest(
                f"{param} example {first} gives `tools`, but the chat template of model {model_name!r} does "
                "not render tools, so the model could never see them. Train a model whose chat template takes "
                "`tools` (Qwen2.5 and later, Hermes, Llama 3.1 and later, or a local model folder whose "
                "tokenizer_config.json has such a template; examples/tool_calling/ shows one for SmolLM2).",
                param=param,
            )
            error.code = f"invalid_{param}"
            raise error
