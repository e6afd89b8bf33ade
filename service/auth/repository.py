from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.tables import ApiKey, Project


def project_by_name(session: Session, name: str) -> Project | None:
    return session.scalars(select(Project).where(Project.name == name)).one_or_none()


def active_key_by_hash(session: Session, key_hash: str) -> ApiKey | None:
    stmt = select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
    return session.scalars(stmt).one_or_none()
