"""One normalisation of email addresses, for every lookup, limit and unique index.

``email_key`` is what identifies an account: NFKC, then Unicode case folding, then NFKC
again (case folding can un-normalise). Signup stores it beside the address as typed,
login and add-collaborator look accounts up by it, and the login limiters count against
it, so two spellings either reach the same account *and* the same budgets, or neither.
PostgreSQL never folds case for us: its ``lower()`` follows the database's locale and
disagrees with Python's (``'İ'``), which is how a second spelling once got a fresh budget.
"""

from __future__ import annotations

import unicodedata


def email_problem(email: str) -> str | None:
    """Why ``email`` cannot name an account (control characters such as NUL), or None."""
    if any(unicodedata.category(ch) == "Cc" for ch in email):
        return "must not contain control characters"
    if email_key(email) != email_key(email_key(email)):
        return "has characters that do not fold to one stable form"
    return None


def email_key(email: str) -> str:
    """The normalised form that identifies an account: NFKC, casefold, NFKC; stripped."""
    folded = unicodedata.normalize("NFKC", email.strip()).casefold()
    return unicodedata.normalize("NFKC", folded)
