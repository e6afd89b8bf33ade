from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from service.core.tables import File

# The upload is parsed by hand as it streams (service/files/upload.py), so FastAPI cannot derive its
# body; this is what that parser accepts. The filename must end in .jsonl: see `encoding`.
UPLOAD_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "title": "FileUpload",
                "required": ["file", "purpose"],
                "additionalProperties": False,
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "minLength": 1,
                        "description": "The JSONL file, one example per line; its filename must end in .jsonl.",
                    },
                    "purpose": {"type": "string", "enum": ["fine-tune"]},
                    "expires_after[anchor]": {
                        "type": "string",
                        "enum": ["created_at"],
                        "description": "With expires_after[seconds]: the file is deleted that long after creation.",
                    },
                    "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000},
                },
            },
            "encoding": {
                "file": {
                    "contentType": "application/jsonl",
                    "headers": {
                        "Content-Disposition": {
                            "schema": {"type": "string"},
                            "example": 'form-data; name="file"; filename="train.jsonl"',
                        }
                    },
                }
            },
        }
    },
}


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    expires_at: int | None = None
    sha256: str

    @classmethod
    def of(cls, row: File) -> FileObject:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=row.created_at,
            filename=row.filename,
            purpose=row.purpose,
            status=row.status,  # type: ignore[arg-type]
            status_details=row.status_details,
            expires_at=row.expires_at,
            sha256=row.sha256,
        )


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
