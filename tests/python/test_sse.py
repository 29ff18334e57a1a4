"""Tern's SSE endpoint read by a Python HTTP client (httpx, streaming; it comes with
ably-python) while ably-python publishes: the Ably Message envelope, and resume after a
cut with `Last-Event-ID` giving exactly the missed messages."""
import asyncio
import json
from urllib.parse import quote

import httpx
from ably import AblyRest

from conftest import ROOT_KEY


async def read_events(response, count):
    """The next `count` SSE message events of a streaming response, as (id, Message)."""
    events, block = [], {}
    async for line in response.aiter_lines():
        if line == "":
            if block.get("event") == "message":
                events.append((block["id"], json.loads(block["data"])))
                if len(events) == count:
                    return events
            block = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            block[field] = value[1:] if value.startswith(" ") else value
    return events


def test_sse_stream_and_resume(tern):
    """Messages published with ably-python stream over SSE; a cut stream resumes from
    Last-Event-ID with 0 lost and 0 duplicated."""

    async def run():
        rest = AblyRest(ROOT_KEY, endpoint="127.0.0.1", port=tern.port, tls=False, use_token_auth=True)
        channel = rest.channels.get("py-sse")
        url = f"http://127.0.0.1:{tern.port}/sse?v=1.2&channels=py-sse&key={quote(ROOT_KEY)}"
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                async with http.stream("GET", url) as response:
                    assert response.status_code == 200
                    assert response.headers["content-type"].startswith("text/event-stream")
                    await asyncio.sleep(0.2)
                    for i in range(3):
                        await channel.publish("n", f"p{i}")
                    first = await asyncio.wait_for(read_events(response, 3), 10)
                # Cut: the stream is closed; three more are published meanwhile.
                for i in range(3, 6):
                    await channel.publish("n", f"p{i}")
                headers = {"Last-Event-ID": first[-1][0]}
                async with http.stream("GET", url, headers=headers) as response:
                    second = await asyncio.wait_for(read_events(response, 3), 10)
            got = [message["data"] for _, message in first + second]
            assert got == [f"p{i}" for i in range(6)]
            assert all(message["channel"] == "py-sse" for _, message in first + second)
        finally:
            await rest.close()

    asyncio.run(run())
