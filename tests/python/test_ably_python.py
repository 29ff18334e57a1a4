"""ably-python 3.1.4 against tern: REST publish, history and realtime subscribe, in JSON
and in the SDK's default binary protocol (msgpack).

Verified in the installed package (ably/types/options.py): options are snake_case
(`endpoint`, `port`, `tls`, `use_binary_protocol`); the realtime transport builds its URL
from the host alone and ignores `port`, so realtime uses endpoint='127.0.0.1:PORT' while
REST uses endpoint='127.0.0.1' with port=PORT.
"""
import asyncio

import pytest
from ably import AblyRealtime, AblyRest

from conftest import ROOT_KEY


def rest_client(port, binary):
    # ably-python refuses Basic auth over plain HTTP (40103), so it signs a token
    # request with the key and uses the token: this exercises requestToken too.
    return AblyRest(ROOT_KEY, endpoint="127.0.0.1", port=port, tls=False, use_binary_protocol=binary,
                    use_token_auth=True)


def realtime_client(port, binary):
    return AblyRealtime(ROOT_KEY, endpoint=f"127.0.0.1:{port}", tls=False, use_binary_protocol=binary)


async def wait_for(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
def test_rest_publish_reaches_realtime_subscriber(tern, binary):
    """A REST publish is delivered to a realtime subscriber, with string and bytes data."""

    async def run():
        realtime = realtime_client(tern.port, binary)
        rest = rest_client(tern.port, binary)
        try:
            await realtime.connection.once_async("connected")
            channel = realtime.channels.get(f"py-{binary}")
            received = []
            await channel.subscribe(lambda message: received.append(message))
            await rest.channels.get(f"py-{binary}").publish("greeting", "hello from python")
            await rest.channels.get(f"py-{binary}").publish("bytes", b"\x00\x01\xfe")
            await wait_for(lambda: len(received) == 2)
            assert received[0].name == "greeting"
            assert received[0].data == "hello from python"
            assert bytes(received[1].data) == b"\x00\x01\xfe"
        finally:
            await realtime.close()
            await rest.close()

    asyncio.run(run())


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
def test_history_pages(tern, binary):
    """History returns published messages newest first and pages with Link headers."""

    async def run():
        rest = rest_client(tern.port, binary)
        try:
            channel = rest.channels.get(f"py-history-{binary}")
            for i in range(5):
                await channel.publish("n", f"m{i}")
            page = await channel.history(limit=2)
            seen = [m.data for m in page.items]
            while page.has_next():
                page = await page.next()
                seen.extend(m.data for m in page.items)
            assert seen == ["m4", "m3", "m2", "m1", "m0"]
            forwards = await channel.history(direction="forwards", limit=10)
            assert [m.data for m in forwards.items] == ["m0", "m1", "m2", "m3", "m4"]
        finally:
            await rest.close()

    asyncio.run(run())
