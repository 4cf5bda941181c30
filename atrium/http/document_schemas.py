"""Request and response models of ``/api/v1/projects/{id}/documents`` (validation and the
OpenAPI document)."""

from __future__ import annotations

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
