"""Listing models and answering chat completions with base, fine-tuned and checkpoint models."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy.orm import Session

from service.auth.service import AuthSubject
from service.core.errors import Conflict, InvalidRequest, NotFound
from service.core.ids import new_id
from service.core.settings import Settings
from service.core.tables import Checkpoint
from service.models import constraints, inference, registry, repository
from service.models.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionCreate,
    Choice,
    ChoiceLogprobs,
    ModelObject,
    ToolCall,
    Usage,
)
from service.models.templates import render_prompt
from service.models.toolplan import ToolPlan, plan_tools

STARTED = int(time.time())
DEFAULT_MAX_TOKENS = 512
MAX_DESCENT = 16  # fine-tuned from fine-tuned from ...: how far back a job's base is looked for


def list_models(session: Session, subject: AuthSubject) -> list[ModelObject]:
    base = [ModelObject(id=name, created=STARTED, owned_by="rft") for name in registry.known_models()]
    tuned = repository.fine_tuned_models(session, subject)
    return base + [ModelObject(id=name, created=created, owned_by=owner) for name, created, owner in tuned]


def get_model(session: Session, subject: AuthSubject, model: str) -> ModelObject:
    for candidate in list_models(session, subject):
        if candidate.id == model:
            return candidate
    raise NotFound(f"The model {model!r} does not exist or you do not have access to it.", param="model")


def training_base(session: Session, subject: AuthSubject, name: str) -> registry.ModelSpec:
    """Where a job's `model` comes from, checked for the caller: a base model, or a `ft:` model the
    project owns or was granted, for which the base model it descends from stands in (same shape,
    same chat template) so the API can plan the job without fetching the checkpoint."""
    if not name.startswith("ft:"):
        return registry.resolve(name)
    ckpt = repository.usable_checkpoint(session, subject.project_id, name)
    if ckpt is None:
        raise InvalidRequest(
            f"No fine-tuned model or checkpoint named {name!r} in this project or shared with it "
            "(GET /v1/models lists them).",
            param="model",
        )
    for _ in range(MAX_DESCENT):
        name = repository.job_of(session, ckpt).model
        if not name.startswith("ft:"):
            return registry.resolve(name)
        # Trained by the checkpoint's project, which could use its own base then.
        ckpt = repository.usable_checkpoint(session, ckpt.project_id, name)
        if ckpt is None:  # that base was deleted since; the trained checkpoint does not need it
            break
    return registry.ModelSpec(name, "ft", "")


def refuse_if_in_use(session: Session, subject: AuthSubject, checkpoints: Sequence[Checkpoint]) -> None:
    """Conflict (409) where removing `checkpoints` of the caller's would pull them from under a job: the
    unfinished job that writes them, or one that trains from or grades with one of them and may still
    use it (the caller's own, or a project's they are still shared with)."""
    names = {c.fine_tuned_model_checkpoint for c in checkpoints}
    writers = {c.job_id for c in checkpoints}
    for job in repository.unfinished_jobs(session):
        if job.id in writers:
            raise Conflict(
                f"Job {job.id}, which wrote these checkpoints, is {job.status}; cancel it or let it finish first.",
                param="model",
            )
        used = [n for n in sorted(names) if n == job.model or n in json.dumps(job.method)]
        if not used:
            continue
        if job.project_id == subject.project_id:
            raise Conflict(
                f"{used[0]!r} is in use by job {job.id} ({job.status}); cancel it or let it finish first.",
                param="model",
            )
        if repository.usable_checkpoint(session, job.project_id, used[0]) is not None:
            raise Conflict(
                f"{used[0]!r} is in use by a {job.status} job of project {job.project_id}, which it is shared "
                "with; revoke that permission first (the job then fails when it next loads the model) or wait.",
                param="model",
            )


class Prepared:
    """A request whose model is loaded and whose prompt fits: ready to generate."""

    def __init__(
        self, body: ChatCompletionCreate, model: Any, tokenizer: Any, prompt: list[int], plan: ToolPlan
    ) -> None:
        self.body, self.model, self.tokenizer, self.prompt, self.tools = body, model, tokenizer, prompt, plan
        context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or len(prompt) + DEFAULT_MAX_TOKENS
        room = context - len(prompt)
        if room <= 0:
            raise InvalidRequest(
                f"The messages take {len(prompt)} tokens; this model's context holds {context}.", param="messages"
            )
        limit = body.completion_limit
        if limit is not None and limit > room:
            raise InvalidRequest(
                f"max_tokens is {limit}, but only {room} tokens fit after the {len(prompt)}-token prompt "
                f"(context {context}).",
                param="max_completion_tokens" if body.max_completion_tokens else "max_tokens",
            )
        self.params = inference.Params(
            max_tokens=limit or min(DEFAULT_MAX_TOKENS, room),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=body.top_p or 1.0,
            n=body.n or 1,
            seed=body.seed,
            stop=tuple(body.stop or ()),
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            logit_bias=_token_biases(body, model),
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            constraint=plan.constraint or constraints.from_response_format(body.response_format, "response_format"),
        )
        self.completion = ChatCompletion(
            id=new_id("chatcmpl-"),
            created=int(time.time()),
            model=body.model,
            choices=[],
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=0, total_tokens=len(prompt)),
        )

    def deltas(self) -> Iterator[list[inference.Delta]]:
        return inference.stream(self.model, self.tokenizer, self.prompt, self.params)


def _token_biases(body: ChatCompletionCreate, model: Any) -> dict[int, float]:
    vocab = int(model.get_output_embeddings().weight.shape[0])
    biases = {int(token): float(bias) for token, bias in (body.logit_bias or {}).items()}
    outside = sorted(t for t in biases if t >= vocab)
    if outside:
        raise InvalidRequest(
            f"logit_bias names token {outside[0]}, but this model's tokens are 0 to {vocab - 1}.", param="logit_bias"
        )
    return biases


def prepare(
    transaction: AbstractContextManager[Session], subject: AuthSubject, settings: Settings, body: ChatCompletionCreate
) -> Prepared:
    """Resolve (in a short transaction) and load the model, and tokenize the prompt."""
    constraints.from_response_format(body.response_format, "response_format")  # a bad format fails before loading
    with transaction as session:
        spec = registry.resolve_for_project(body.model, settings, subject.project_id, session)
    model, tokenizer = registry.load(body.model, settings, device=_device(), spec=spec)
    messages = [m.model_dump(exclude_none=True, exclude={"name", "refusal"}) for m in body.messages]
    plan = plan_tools(body, tokenizer)
    text = render_prompt(tokenizer, messages, plan.rendered)
    plan = plan.for_prompt(text)
    return Prepared(body, model, tokenizer, list(tokenizer(text, add_special_tokens=False)["input_ids"]), plan)


def complete(prepared: Prepared) -> ChatCompletion:
    n = prepared.params.n
    texts, reasons, tokens = [""] * n, ["length"] * n, [0] * n
    logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    for deltas in prepared.deltas():
        for delta in deltas:
            texts[delta.index] += delta.text
            logprobs[delta.index] += delta.logprobs or []
            if delta.finish_reason:
                reasons[delta.index], tokens[delta.index] = delta.finish_reason, delta.completion_tokens
    result = prepared.completion
    result.choices = []
    for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
        content, calls = prepared.tools.parse(text)
        reported = prepared.params.logprobs is not None
        result.choices.append(
            Choice(
                index=i,
                message=AssistantMessage(
                    content=content if content or not calls else None,
                    tool_calls=[ToolCall.model_validate(c) for c in calls] or None,
                ),
                finish_reason="tool_calls" if calls and reason == "stop" else reason,
                logprobs=ChoiceLogprobs.model_validate({"content": logprobs[i]}) if reported else None,
            )
        )
    result.usage = _usage(len(prepared.prompt), sum(tokens))
    return result


def stream_chunks(prepared: Prepared) -> Iterator[dict[str, Any]]:
    """OpenAI's chunk sequence: a role delta per choice, content deltas, finish reasons, usage.
    Where the answer may be tool calls, a choice's text is held until it ends (a call is only
    known once it is whole), then sent as content and `tool_calls` deltas."""
    result, n = prepared.completion, prepared.params.n
    yield result.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}} for i in range(n)])
    generated, held = 0, [""] * n
    for deltas in prepared.deltas():
        choices = []
        for delta in deltas:
            generated += delta.completion_tokens
            choice: dict[str, Any] = {"index": delta.index, "delta": {}, "finish_reason": None}
            if prepared.tools.parsing:
                held[delta.index] += delta.text
                if delta.finish_reason:
                    choice["delta"], choice["finish_reason"] = _called(prepared, held[delta.index], delta.finish_reason)
            else:
                choice["delta"] = {"content": delta.text} if delta.text else {}
                choice["finish_reason"] = delta.finish_reason
            if delta.logprobs is not None:
                choice["logprobs"] = {"content": delta.logprobs, "refusal": None}
            if choice["delta"] or choice["finish_reason"] or delta.logprobs:
                choices.append(choice)
        if choices:
            yield result.chunk(choices)
    options = prepared.body.stream_options
    if options is not None and options.include_usage:
        yield result.chunk([], usage=_usage(len(prepared.prompt), generated))


def _called(prepared: Prepared, text: str, reason: str) -> tuple[dict[str, Any], str]:
    content, calls = prepared.tools.parse(text)
    delta: dict[str, Any] = {"content": content} if content else {}
    if calls:
        delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
        reason = "tool_calls" if reason == "stop" else reason
    return delta, reason


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
