"""Request and response models of ``/api/v1/projects/{id}/documents`` (validation and the
OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, Field

from ..realtime.protocol import MAX_PATH_LENGTH
from .job_schemas import Text
from .schemas import _Strict


class DocumentTicketRequest(_Strict):
    path: Text = Field(
        min_length=1,
        max_length=MAX_PATH_LENGTH,
        description="The document's path in the project, as FILE_CHANGE names files",
        examples=["/src/app.py"],
    )


class DocumentTicketResponse(BaseModel):
    ticket: str = Field(description="Pass as the provider's params: { ticket }")
    url: str = Field(description="The provider's serverUrl: ws[s]://<host>/ws/documents")
    room: str = Field(description="The provider's roomname: the document's opaque id")
    expires_in: int = Field(
        description="Seconds (DOC_TICKET_SECONDS) during which the ticket may open connections"
    )


# -- documents over REST (``atrium/http/document_content.py``) -------------------------


class DocumentResponse(BaseModel):
    id: UUID
    room: str = Field(description="The id the WebSocket URL takes (/ws/documents/{room})")
    project_id: UUID
    path: str
    size: int = Field(description="Bytes stored: the latest snapshot plus the updates after it")
    seq: int = Field(description="How many updates the document has had (0: none yet)")
    created_by: UUID | None
    created_at: datetime
    updated_at: datetime = Field(description="When its latest update was stored")
    last_edited_by: UUID | None = Field(
        description="Who made its latest update (null: nobody yet, or the account is gone)"
    )


class DocumentListQuery(BaseModel):
    path: Text | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_PATH_LENGTH,
        description="Only the document at this path (none or one; limit and offset unused)",
    )
    limit: int = Field(default=100, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=1_000_000_000)


class DocumentListResponse(BaseModel):
    project_id: UUID
    documents: list[DocumentResponse]
    total: int = Field(description="How many documents the project has (or match path)")
    limit: int
    offset: int


class DocumentTextResponse(BaseModel):
    document: DocumentResponse
    text: str = Field(description="The text of its Y.Text named content")


class DocumentWriteRequest(_Strict):
    path: Text = Field(
        min_length=1,
        max_length=MAX_PATH_LENGTH,
        description="The document's path in the project, as FILE_CHANGE names files",
        examples=["/src/app.py"],
    )
    text: str = Field(description="The document's whole new text (DOC_MAX_BYTES)")
