"""Standard Webhooks signatures (https://www.standardwebhooks.com), as OpenAI signs its own webhooks.

A secret is `whsec_` and the base64 of 32 random bytes. A delivery carries `webhook-id` (the event's id,
the same on every retry, so a receiver can drop duplicates), `webhook-timestamp` (unix seconds of this
attempt) and `webhook-signature`: `v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` keyed
with the secret's decoded bytes; several space-separated while an old secret is still honoured.
The openai SDK's `client.webhooks.unwrap` / `verify_signature` check these as they are.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

PREFIX = "whsec_"


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def hint(secret: str) -> str:
    """What the API shows of a secret after creation: enough to tell two apart, not to sign."""
    return secret[: len(PREFIX) + 4] + "..." + secret[-2:]


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(PREFIX))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(signing_secrets: list[str], message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one attempt to deliver `body`, signed with each of `signing_secrets`."""
    return {
        "content-type": "application/json",
        "user-agent": "rft-webhooks/1",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, message_id, timestamp, body) for s in signing_secrets),
    }
