"""The official openai SDK pointed at a test app, as a user's code would hold it."""

from __future__ import annotations

import openai
from fastapi.testclient import TestClient


def sdk(client: TestClient, auth: dict[str, str]) -> openai.OpenAI:
    key = auth["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=client, max_retries=0)
