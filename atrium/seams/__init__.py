"""Seams: the only code in atrium that leans on a library's internals.

A *seam* is a module where atrium reaches past a library's public API, to be fast or to
be safe: it subclasses a class the library treats as its own, reads or overrides private
names, or speaks the library's wire format by hand. Each seam module says which version of
the library it was written against, why it exists, and exactly what it relies on;
pyproject.toml gives each of those libraries an upper bound, and tests/test_seams.py
checks every attribute, signature and behaviour a seam relies on, failing with a message
that names the seam and the library when an upgrade changes one.

- ``hypercorn_server``: hypercorn's trio serve loop with each TCP connection inside a
  failure boundary (a subclass of its ``TCPServer``; a copy of its ``worker_serve``).
- ``llhttp_protocol``: atrium's own HTTP/1.1 protocol on httptools (llhttp), in place of
  hypercorn's ``H11Protocol`` and ``HTTPStream`` (``HTTP_PARSER=httptools``, the default).
- ``refusals``: the responses both HTTP/1.1 protocols write themselves (a malformed
  request, a head too large), in atrium's JSON error shape.
- ``aio_loop``: trio-asyncio's event loop with asyncio's callback passes (private
  ``_loop`` and ``_handles``, overridden private methods).
- ``redis_wire``: Redis commands packed and written on one pooled redis-py connection,
  answers read (or skipped) by hand.
- ``wsproto_server``: the wsproto names the dedicated WebSocket listener uses, and the
  text frames it writes itself, bypassing wsproto.

Nothing is patched at import. Seams are infrastructure below every other layer: they import
libraries and the standard library only, never another part of atrium, and any layer
(``persistence``, the bridge, ``http``, the metrics server) may import them.
"""
