"""Webhooks: per-project endpoints that receive job events, signed the Standard Webhooks way."""
