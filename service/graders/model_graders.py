"""score_model and label_model: a local causal LM reads the templated messages and answers.

Generation is batched (left padding) over all samples of a call: `generate` here, where the API grades
(`/graders/run`), or a training job's rollout engine (`workers.rl.judge`), which the job passes as the
`judge` of `compile_grader`. The answer is parsed on our side:
`score_model` takes the first number and clips it to `range`; `label_model` takes the label the
answer names, and its answers are held to its labels by constrained decoding (`constraints.for_labels`:
exactly one label, nothing around it), so even a small judge answers with one. An answer that
refuses, or that has no number / no label, is a counted error with reward 0.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from service.core.settings import Settings
from service.graders.schemas import LabelModelGrader, SamplingParams, ScoreModelGrader
from service.models.constraints import Constraint

NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
REFUSAL = re.compile(r"^\s*(i'?m sorry|i am sorry|sorry,|i can(?:no|')t|i am unable|i'm unable|as an ai)", re.I)
DEFAULT_MAX_TOKENS = 32
_locks: dict[str, threading.Lock] = {}


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int


class Judge(Protocol):
    """What answers a model grader's prompts, one `Answer` per conversation: `generate` below, or a
    training job's rollout engine (`workers.rl.judge.EngineJudge`). A `constraint` holds every
    answer to its grammar (a `label_model`'s labels)."""

    def __call__(
        self,
        model_name: str,
        conversations: list[list[dict[str, str]]],
        params: SamplingParams | None,
        settings: Settings,
        project_id: str | None,
        constraint: Constraint | None = None,
    ) -> list[Answer]: ...


def generate(
    model_name: str,
    conversations: list[list[dict[str, str]]],
    params: SamplingParams | None,
    settings: Settings,
    project_id: str | None = None,
    constraint: Constraint | None = None,
) -> list[Answer]:
    """One answer per conversation from a local model (loaded once per process), each held to
    `constraint` where given."""
    import torch

    from service.models import thinking
    from service.models.registry import load
    from service.models.templates import eos_ids, render_prompt

    model, tokenizer = load(model_name, settings, project_id=project_id)
    params = params or SamplingParams()
    tokenizer = thinking.pin(tokenizer, model_name, params.reasoning_effort, "sampling_params.reasoning_effort")
    prompts = [render_prompt(tokenizer, c) for c in conversations]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    sampling = (params.temperature or 0) > 0
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.max_completions_tokens or DEFAULT_MAX_TOKENS,
        "do_sample": sampling,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if sampling:
        kwargs.update(temperature=params.temperature, top_p=params.top_p or 1.0)
    if constraint is not None:
        from service.models.guided import Guide, GuideProcessor

        vocab = int(model.get_output_embeddings().weight.shape[0])
        guide = Guide(constraint, tokenizer, len(prompts), vocab, eos_ids(model, tokenizer))
        kwargs["logits_processor"] = [GuideProcessor(guide, batch["input_ids"].shape[1])]
    with _locks.setdefault(model_name, threading.Lock()), torch.inference_mode():
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out = model.generate(**batch, **kwargs)  # (B, T_prompt + T_new)
    prompt_len = batch["input_ids"].shape[1]
    stops = torch.tensor(eos_ids(model, tokenizer))
    answers = []
    for row, mask in zip(out, batch["attention_mask"], strict=True):
        new = row[prompt_len:]
        stop = torch.isin(new, stops).nonzero()
        new = new[: int(stop[0]) + 1] if len(stop) else new
        answers.append(Answer(tokenizer.decode(new, skip_special_tokens=True), int(mask.sum()), len(new)))
    return answers


def parse_score(answer: str, config: ScoreModelGrader) -> tuple[float | None, str | None]:
    """(score clipped to range, None) or (None, error flag)."""
    if REFUSAL.match(answer):
        return None, "model_grader_refusal_error"
    value = read_number(answer)
    if value is None:
        return None, "model_grader_parse_error"
    low, high = config.range
    return min(max(value, low), high), None


def read_number(answer: str) -> float | None:
    """The number a grader model answered, read in this order: the whole answer is a number; the
    number after `=`, `score`, `rating` or `is`; else the last number that is not a denominator
    (`7/10` and `7 out of 10` read 7)."""
    text = answer.strip().rstrip(".")
    if NUMBER.fullmatch(text):
        return float(text)
    cue = re.search(rf"(?:=|score|rating|\bis)\s*:?\s*({NUMBER.pattern})", text, re.I)
    if cue:
        return float(cue.group(1))
    candidates = [m for m in NUMBER.finditer(text) if not re.search(r"(/|out of)\s*$", text[: m.start()], re.I)]
    return float(candidates[-1].group(0)) if candidates else None


def parse_label(answer: str, config: LabelModelGrader) -> tuple[str | None, str | None]:
    """(label, None) or (None, error flag); an exact answer wins, else the earliest label named."""
    if REFUSAL.match(answer):
        return None, "model_grader_refusal_error"
    cleaned = answer.strip().strip(".!\"'`*").strip().lower()
    for label in config.labels:
        if cleaned == label.lower():
            return label, None
    found = []
    for label in config.labels:
        hit = re.search(rf"(?<!\w){re.escape(label.lower())}(?!\w)", answer.lower())
        if hit:
            found.append((hit.start(), label))
    if not found:
        return None, "model_grader_parse_error"
    return min(found)[1], None
