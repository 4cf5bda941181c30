"""Document tickets, issued and verified without a server: a ticket opens only what it was
signed for, for DOC_TICKET_SECONDS, and is never mistaken for an access token (nor an
access token for a ticket)."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest

from atrium.identity.tickets import TicketCodec
from atrium.identity.tokens import TokenCodec, TokenError

SECRET = "unit-test-secret-" + "x" * 48
USER, SESSION = uuid.uuid4(), uuid.uuid4()
PROJECT, DOCUMENT = uuid.uuid4(), uuid.uuid4()
TICKETS = TicketCodec(SECRET, "atrium", "atrium-api", 60)
TOKENS = TokenCodec(SECRET, "atrium", "atrium-api", 900, 3600)


def ticket(codec: TicketCodec = TICKETS, now: float | None = None) -> str:
    signed, _ = codec.issue(
        user_id=USER, session_id=SESSION, project_id=PROJECT, document_id=DOCUMENT, now=now
    )
    return signed


def refused(codec: TicketCodec, signed: str) -> str:
    with pytest.raises(TokenError) as caught:
        codec.verify(signed)
    return caught.value.code


def test_a_ticket_carries_who_and_what_it_opens() -> None:
    verified = TICKETS.verify(ticket())
    assert (verified.user_id, verified.session_id) == (USER, SESSION)
    assert (verified.project_id, verified.document_id) == (PROJECT, DOCUMENT)
    assert verified.expires_at - time.time() == pytest.approx(60, abs=2)


def test_a_ticket_is_valid_for_its_window_only() -> None:
    assert TICKETS.verify(ticket(now=time.time() - 50)).document_id == DOCUMENT
    assert refused(TICKETS, ticket(now=time.time() - 61)) == "ticket_expired"


def test_tampered_tickets_are_refused() -> None:
    signed = ticket()
    head, body, signature = signed.split(".")
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    assert refused(TICKETS, f"{head}.{body}.{flipped}") == "ticket_invalid"
    # The same claims for another document, re-encoded without the secret.
    claims = jwt.decode(signed, options={"verify_signature": False})
    claims["did"] = str(uuid.uuid4())
    forged = jwt.encode(claims, "not-the-secret-" + "y" * 40, algorithm="HS256")
    assert refused(TICKETS, forged) == "ticket_invalid"
    assert refused(TICKETS, "not.a.jwt") == "ticket_malformed"
    assert refused(TICKETS, "") == "ticket_malformed"


def test_an_access_token_is_not_a_ticket_nor_a_ticket_an_access_token() -> None:
    access, _ = TOKENS.issue(
        type="access", user_id=USER, email="a@example.com", role="user", session_id=SESSION
    )
    assert refused(TICKETS, access) == "ticket_invalid"
    with pytest.raises(TokenError) as caught:
        TOKENS.verify(ticket(), expected="access")
    assert caught.value.code == "token_invalid_audience"


def test_a_ticket_signed_with_the_right_secret_but_another_type_is_refused() -> None:
    claims = jwt.decode(ticket(), options={"verify_signature": False})
    claims["typ"] = "access"
    assert refused(TICKETS, jwt.encode(claims, SECRET, algorithm="HS256")) == "ticket_invalid"
    claims["typ"], claims["pid"] = "document_ticket", "not-a-uuid"
    assert refused(TICKETS, jwt.encode(claims, SECRET, algorithm="HS256")) == "ticket_malformed"
