"""Document tickets: short-lived signed permissions to open a live document's WebSocket.

A browser's WebSocket cannot send an Authorization header and an access token must never
sit in a URL, so a client first asks REST for a ticket (bearer auth, membership checked)
and puts the ticket in the connection URL. A ticket is a JWT (HS256, the app's secret)
bound to the user, the login session, the project and the document; any process with the
secret accepts it, so it works behind ``--workers`` and a load balancer. It is valid for
``ttl_seconds`` (DOC_TICKET_SECONDS), during which it may open connections: the y-websocket
provider's automatic reconnects reuse it. Its audience and type are its own, so an access
token is never accepted as a ticket, nor a ticket as an access token.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt

from .tokens import TokenError

_ALGORITHM = "HS256"
_TYPE = "document_ticket"
# Checked by pyjwt before the audience; the ticket's own claims are read after it, so an
# access token (no "pid") is refused as not valid here rather than as malformed.
_REQUIRED = ["sub", "exp", "iat", "aud", "iss", "jti"]


@dataclass(frozen=True, slots=True)
class Ticket:
    """The verified claims of a document ticket."""

    user_id: uuid.UUID
    session_id: uuid.UUID
    project_id: uuid.UUID
    document_id: uuid.UUID
    expires_at: int


@dataclass(frozen=True, slots=True)
class TicketCodec:
    """Signs and verifies document tickets for one secret and issuer.

    ``audience`` is the API's (JWT_AUDIENCE); tickets carry it with a ``/documents``
    suffix, which an access token never has.
    """

    secret: str
    issuer: str
    audience: str
    ttl_seconds: int

    @property
    def ticket_audience(self) -> str:
        return f"{self.audience}/documents"

    def issue(
        self,
        *,
        user_id: uuid.UUID,
        session_id: uuid.UUID,
        project_id: uuid.UUID,
        document_id: uuid.UUID,
        now: float | None = None,
    ) -> tuple[str, Ticket]:
        """Sign a ticket valid for ``ttl_seconds`` from ``now`` (default: the wall clock)."""
        issued = int(time.time() if now is None else now)
        ticket = Ticket(user_id, session_id, project_id, document_id, issued + self.ttl_seconds)
        payload: dict[str, Any] = {
            "sub": str(user_id),
            "sid": str(session_id),
            "pid": str(project_id),
            "did": str(document_id),
            "iat": issued,
            "exp": ticket.expires_at,
            "aud": self.ticket_audience,
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "typ": _TYPE,
        }
        return jwt.encode(payload, self.secret, algorithm=_ALGORITHM), ticket

    def verify(self, ticket: str) -> Ticket:
        """The claims of a valid, unexpired ticket.

        Raises ``TokenError`` with code ticket_expired, ticket_invalid (a bad signature,
        another audience or issuer: an access token is one) or ticket_malformed.
        """
        try:
            payload = jwt.decode(
                ticket,
                self.secret,
                algorithms=[_ALGORITHM],
                audience=self.ticket_audience,
                issuer=self.issuer,
                options={"require": _REQUIRED},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("ticket_expired", "The ticket has expired") from None
        except (jwt.InvalidSignatureError, jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise TokenError("ticket_invalid", "The ticket is not valid here") from None
        except jwt.PyJWTError:
            raise TokenError("ticket_malformed", "The ticket is malformed") from None
        if payload.get("typ") != _TYPE:
            raise TokenError("ticket_invalid", "The ticket is not valid here")
        try:
            return Ticket(
                user_id=uuid.UUID(payload["sub"]),
                session_id=uuid.UUID(payload["sid"]),
                project_id=uuid.UUID(payload["pid"]),
                document_id=uuid.UUID(payload["did"]),
                expires_at=int(payload["exp"]),
            )
        except (KeyError, ValueError, TypeError, AttributeError):
            raise TokenError("ticket_malformed", "The ticket is malformed") from None
