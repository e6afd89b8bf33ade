from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.core.settings import Settings


def test_dev_mode_runs_on_embedded_defaults() -> None:
    settings = Settings(env="dev", database_url="", broker_url="")
    assert settings.sqlalchemy_url.startswith("sqlite:///")
    assert settings.celery_broker_url == "filesystem://"


def test_prod_mode_refuses_the_dev_secret_and_embedded_stack() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(env="prod", database_url="", broker_url="")
    message = str(info.value)
    assert "RFT_SECRET_KEY" in message and "RFT_DATABASE_URL" in message and "RFT_BROKER_URL" in message


def test_prod_mode_accepts_explicit_safe_settings() -> None:
    settings = Settings(
        env="prod", secret_key="s" * 40, database_url="postgresql+psycopg://db/rft", broker_url="redis://redis:6379/0"
    )
    assert settings.sqlalchemy_url == "postgresql+psycopg://db/rft"


def test_settings_read_the_rft_env_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RFT_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.setenv("RFT_BROKER_URL", "redis://127.0.0.1:6379/3")
    settings = Settings()
    assert settings.max_upload_bytes == 1234
    assert settings.celery_broker_url == "redis://127.0.0.1:6379/3"
