"""Cursor pagination over the `seq` column, OpenAI's `{object: "list", data, has_more}` shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from sqlalchemy import Select
from sqlalchemy.orm import Session

from service.core.errors import InvalidRequest


def paginate(
    session: Session,
    stmt: Select[Any],
    model: type[Any],
    *,
    after: str | None,
    limit: int,
    order: Literal["asc", "desc"] = "desc",
) -> tuple[Sequence[Any], bool]:
    """Rows of `stmt` (already scoped) after the row whose public id is `after`, and has_more."""
    if after:
        cursor = session.scalar(stmt.with_only_columns(model.seq).where(model.id == after))
        if cursor is None:
            raise InvalidRequest(f"'after' cursor {after!r} is not an id in this list.", param="after")
        stmt = stmt.where(model.seq < cursor if order == "desc" else model.seq > cursor)
    stmt = stmt.order_by(model.seq.desc() if order == "desc" else model.seq.asc()).limit(limit + 1)
    rows = session.scalars(stmt).all()
    return rows[:limit], len(rows) > limit


def list_body(data: list[dict[str, Any]], has_more: bool, *, with_ids: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
    if with_ids:
        body["first_id"] = data[0]["id"] if data else None
        body["last_id"] = data[-1]["id"] if data else None
    return body
