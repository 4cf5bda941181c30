"""The client's address behind trusted reverse proxies (TRUSTED_PROXIES, X-Forwarded-For)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from ..core.config import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


def _trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)


def client_address(peer: str, forwarded_for: Iterable[str], trusted: Sequence[IPNetwork]) -> str:
    """The address a request came from, as rate limits should count it.

    ``peer`` is the immediate TCP peer; ``forwarded_for`` the X-Forwarded-For header
    values in order. Unless the peer is a trusted proxy, it is the answer and the header is
    ignored (anyone can send one). Otherwise the hops are walked from the right, skipping
    trusted ones: the first untrusted hop is the client. A hop that is not an IP address
    ends the walk at the last trusted hop (it was not written by a proxy we trust); when
    every hop is trusted, the leftmost is the answer.
    """
    current = _address(peer)
    if current is None or not trusted or not _trusted(current, trusted):
        return peer
    hops = [hop for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break
        current = address
        if not _trusted(address, trusted):
            break
    return str(current)


def client_scheme(
    peer: str, scheme: str, forwarded_proto: str | None, trusted: Sequence[IPNetwork]
) -> str:
    """The scheme (http or https) the client used, for URLs handed back to it.

    ``scheme`` is what reached this server; behind a trusted proxy (the peer is in
    TRUSTED_PROXIES) that terminated TLS, the proxy's ``X-Forwarded-Proto`` (its last
    value: the hop nearest us) says what the client used. From any other peer the header
    is ignored.
    """
    address = _address(peer)
    if forwarded_proto is None or address is None or not _trusted(address, trusted):
        return scheme
    proto = forwarded_proto.split(",")[-1].strip().lower()
    return proto if proto in ("http", "https") else scheme
