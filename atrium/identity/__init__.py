"""Who is asking, and may they: identity and admission.

Access and refresh tokens (``tokens``), password hashing off the event loop
(``passwords``), per-key rate limits and login backoff (``ratelimit``), the admission of a
request (``admission``: its limits and the cached user and memberships of ``cache``),
which client address to trust behind proxies (``proxies``), and ending a revoked login
session's live sockets on every process (``sessions``). Above persistence, below the
realtime and domain layers (what ``sessions`` needs of the live connections is a Protocol).
"""
