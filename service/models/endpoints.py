from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from service.core.http import SessionDep, SettingsDep, SubjectDep, request_transaction
from service.models import service
from service.models.schemas import ChatCompletion, ChatCompletionCreate, ModelList, ModelObject

router = APIRouter(tags=["models"])
log = logging.getLogger(__name__)


@router.get("/v1/models", response_model=ModelList)
def list_models(session: SessionDep, subject: SubjectDep) -> ModelList:
    """List base models and the project's fine-tuned models and checkpoints (`ft:...`)."""
    return ModelList(data=service.list_models(session, subject))


@router.get("/v1/models/{model:path}", response_model=ModelObject)
def retrieve_model(model: str, session: SessionDep, subject: SubjectDep) -> ModelObject:
    """Retrieve a model by name."""
    return service.get_model(session, subject, model)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}, "description": "With `stream=true`: chunks as SSE."}},
)
def create_chat_completion(
    body: ChatCompletionCreate, request: Request, subject: SubjectDep, settings: SettingsDep
) -> Any:
    """Answer a conversation with a base model, a fine-tuned model or one of its checkpoints."""
    # A sync endpoint: loading and generating run in the thread pool, never on the event loop.
    prepared = service.prepare(request_transaction(request), subject, settings, body)
    if not body.stream:
        return service.complete(prepared)
    return StreamingResponse(_sse(service.stream_chunks(prepared)), media_type="text/event-stream")


def _sse(chunks: Iterator[dict[str, Any]]) -> Iterator[str]:
    """Server-sent events; a failure after the headers went out becomes an error event."""
    try:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
    except Exception:
        log.exception("chat stream failed")
        error = {"message": "The server had an error while generating.", "type": "server_error", "code": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
        return
    yield "data: [DONE]\n\n"
