"""Per-connection push and inbound webhooks with ably-python 3.1.4: a realtime client
subscribes to its own channel `[connection]<connectionId>`, a backend (ably-python's REST
`request`, token auth) pushes to it by id and reads its state; an unenveloped publish
(`?enveloped=false`) delivers a JSON body as one message.
"""
import asyncio
import json

from ably import AblyRealtime, AblyRest

from conftest import ROOT_KEY


def rest_client(port):
    # ably-python refuses Basic auth over plain HTTP (40103): it uses a token.
    return AblyRest(ROOT_KEY, endpoint="127.0.0.1", port=port, tls=False, use_binary_protocol=False,
                    use_token_auth=True)


async def wait_for(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


def test_push_to_a_connection_by_id(tern):
    """A message POSTed to /connections/{id}/messages reaches that connection's own
    channel once; GET reports it connected; an unknown id is 404/80022."""

    async def run():
        realtime = AblyRealtime(ROOT_KEY, endpoint=f"127.0.0.1:{tern.port}", tls=False,
                                use_binary_protocol=False, client_id="py-client")
        rest = rest_client(tern.port)
        try:
            await realtime.connection.once_async("connected")
            connection_id = realtime.connection.connection_manager.connection_id
            received = []
            await realtime.channels.get(f"[connection]{connection_id}").subscribe(lambda message: received.append(message))
            body = {"name": "notice", "data": "for you only"}
            answer = await rest.request("POST", f"/connections/{connection_id}/messages", "3", body=body)
            assert answer.status_code == 201
            await wait_for(lambda: len(received) == 1)
            assert (received[0].name, received[0].data) == ("notice", "for you only")
            state = await rest.request("GET", f"/connections/{connection_id}", "3")
            assert state.status_code == 200
            details = state.items[0]
            assert details["state"] == "connected"
            assert details["clientId"] == "py-client"
            missing = await rest.request("GET", f"/connections/{connection_id.split('-')[0]}-AAAAAAAAAAAA", "3")
            assert missing.status_code == 404
            assert int(missing.error_code) == 80022  # ably-python reads it from the X-Ably-ErrorCode header
            await asyncio.sleep(0.3)
            assert len(received) == 1
        finally:
            await realtime.close()
            await rest.close()

    asyncio.run(run())


def test_unenveloped_publish(tern):
    """`?enveloped=false` publishes the JSON body itself as one message's data."""

    async def run():
        realtime = AblyRealtime(ROOT_KEY, endpoint=f"127.0.0.1:{tern.port}", tls=False,
                                use_binary_protocol=False)
        rest = rest_client(tern.port)
        try:
            await realtime.connection.once_async("connected")
            received = []
            await realtime.channels.get("py-webhook").subscribe(lambda message: received.append(message))
            answer = await rest.request("POST", "/channels/py-webhook/messages", "3",
                                        params={"enveloped": "false", "name": "hook"},
                                        body={"event": "push", "n": 1})
            assert answer.status_code == 201
            await wait_for(lambda: len(received) == 1)
            data = received[0].data
            if isinstance(data, str):
                data = json.loads(data)
            assert (received[0].name, data) == ("hook", {"event": "push", "n": 1})
        finally:
            await realtime.close()
            await rest.close()

    asyncio.run(run())
