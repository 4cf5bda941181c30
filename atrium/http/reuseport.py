"""Sockets that several processes bind to one port (SO_REUSEPORT), for ``run.py --workers``.

The kernel hands each new connection to one of the listening sockets in the group (by a
hash of the connection's addresses), so N processes share PORT and WS_PORT with no
proxy between them. A socket that is bound but not listening receives no connections: the
process group keeps one such socket per port to hold the port (and to learn which one the
kernel picked for port 0) while its serving processes come and go.
"""

from __future__ import annotations

import socket


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with SO_REUSEPORT (and SO_REUSEADDR), not yet
    listening. The family follows hypercorn's rule for a bind string: IPv6 when ``host``
    has a colon, else IPv4. Raises OSError when the port is held by a socket that did not
    ask to share it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host.strip("[]"), port))
    except BaseException:
        sock.close()
        raise
    return sock
