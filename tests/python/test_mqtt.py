"""Tern's MQTT 3.1.1 adapter (docs/mqtt.md) against paho-mqtt and raw MQTT bytes, with
ably-python on the other side: topics are channels, payloads cross both ways unchanged,
credentials and capabilities get MQTT's codes, over-size packets are refused, keep-alive
and the last will work, and a PUBACK is sent only once the message is stored (a server
killed mid-stream loses none of the PUBACKed messages)."""
import asyncio
import base64
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import paho.mqtt.client as mqtt
import pytest
from ably import AblyRealtime, AblyRest

from conftest import ROOT_KEY, TERN_BIN, Tern

KEY_NAME, KEY_SECRET = ROOT_KEY.split(":")
LIMITED_KEY = "test.limited:limitedsecret"
MAX_MESSAGE_SIZE = 2048
PACKET_BYTES_MAX = 4096
WAIT = 10

CONFIG = f"""
[server]
host = "127.0.0.1"
port = 0

[limits]
max_message_size = {MAX_MESSAGE_SIZE}

[history]
mode = "redb"
path = "history.redb"

[mqtt]
enabled = true
port = 0
packet_bytes_max = {PACKET_BYTES_MAX}
subscriptions_per_connection_max = 3

[[apps]]
id = "test"

[[apps.keys]]
id = "root"
secret = "rootsecret"
capability = '{{"*":["*"]}}'

[[apps.keys]]
id = "limited"
secret = "limitedsecret"
capability = '{{"allowed:*":["publish","subscribe"]}}'
"""


class MqttTern(Tern):
    """A `tern serve` with MQTT enabled; restartable on the same data directory."""

    def __init__(self, workdir, config=CONFIG):
        super().__init__(workdir, config)

    def start(self, port=0):
        super().start(port)
        assert self.mqtt_port, "the MQTT line comes before the client port's"
        return self


@pytest.fixture(scope="module")
def tern():
    with tempfile.TemporaryDirectory() as workdir:
        server = MqttTern(workdir).start()
        yield server
        server.stop()


# -- raw MQTT 3.1.1 bytes, for what paho hides (exact codes, keep-alive, kills) --------

def varint(n):
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_string(value):
    data = value if isinstance(value, bytes) else value.encode()
    return len(data).to_bytes(2, "big") + data


def packet(first_byte, body):
    return bytes([first_byte]) + varint(len(body)) + body


def connect_packet(client_id, username=None, password=None, keepalive=60, will=None, clean=True):
    flags = 0x02 if clean else 0
    payload = mqtt_string(client_id)
    if will:
        flags |= 0x04
        payload += mqtt_string(will[0]) + mqtt_string(will[1])
    if username is not None:
        flags |= 0x80
        payload += mqtt_string(username)
    if password is not None:
        flags |= 0x40
        payload += mqtt_string(password)
    header = mqtt_string("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big")
    return packet(0x10, header + payload)


def publish_packet(topic, payload, qos=0, packet_id=0):
    body = mqtt_string(topic)
    if qos:
        body += packet_id.to_bytes(2, "big")
    return packet(0x30 | (qos << 1), body + payload)


def subscribe_packet(packet_id, topics):
    body = packet_id.to_bytes(2, "big")
    for topic, qos in topics:
        body += mqtt_string(topic) + bytes([qos])
    return packet(0x82, body)


def read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def read_packet(sock):
    """(first byte, body); ConnectionError once the server has closed."""
    first = read_exact(sock, 1)[0]
    length, shift = 0, 0
    while True:
        byte = read_exact(sock, 1)[0]
        length += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, read_exact(sock, length)


def raw_connect(tern, username=KEY_NAME, password=KEY_SECRET, keepalive=60, will=None, client_id="raw",
                clean=True, session_present=False):
    """A socket after CONNECT; returns (socket, CONNACK return code). Checks the
    CONNACK's session-present flag."""
    sock = socket.create_connection(("127.0.0.1", tern.mqtt_port), timeout=WAIT)
    sock.sendall(connect_packet(client_id, username, password, keepalive, will, clean))
    first, body = read_packet(sock)
    assert first == 0x20 and len(body) == 2
    assert body[0] == (1 if session_present else 0), "session present"
    return sock, body[1]


def read_publish(sock):
    """(dup, qos, packet id, topic, payload) of the next packet, which must be a PUBLISH."""
    first, body = read_packet(sock)
    assert first >> 4 == 3, hex(first)
    qos = (first >> 1) & 3
    length = int.from_bytes(body[:2], "big")
    topic, rest = body[2:2 + length].decode(), body[2 + length:]
    packet_id = int.from_bytes(rest[:2], "big") if qos else 0
    return bool(first & 0x08), qos, packet_id, topic, rest[2:] if qos else rest


def puback(packet_id):
    return packet(0x40, packet_id.to_bytes(2, "big"))


def closed_by_server(sock, within):
    """Whether the server closes `sock` within `within` seconds (reading what comes)."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except socket.timeout:  # an OSError too: caught first
        return False
    except OSError:
        return True


# -- paho ---------------------------------------------------------------------------

class Paho:
    """A paho-mqtt 3.1.1 client with its network loop on a thread; what it receives is
    collected."""

    def __init__(self, tern, client_id, username=KEY_NAME, password=KEY_SECRET, transport="tcp"):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311, transport=transport)
        if transport == "websockets":
            self.client.ws_set_options(path="/mqtt")
        if username is not None:
            self.client.username_pw_set(username, password)
        self.messages = []
        self.subacks = {}
        self.acked = set()
        self.connected = threading.Event()
        self.reason = None
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload, m.qos))
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subacks.__setitem__(mid, codes)
        self.client.on_publish = lambda c, u, mid, rc, p: self.acked.add(mid)
        self.client.connect("127.0.0.1", tern.mqtt_port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason, properties):
        self.reason = reason
        self.connected.set()

    def subscribe(self, topic, qos=1):
        _, mid = self.client.subscribe(topic, qos)
        wait(lambda: mid in self.subacks)
        return [code.value for code in self.subacks[mid]]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def wait(predicate, timeout=WAIT):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def history(tern, channel):
    """Every message of `channel`'s history, oldest first, as (data bytes, message)."""
    auth = "Basic " + base64.b64encode(ROOT_KEY.encode()).decode()
    base = f"http://127.0.0.1:{tern.port}/channels/{quote(channel, safe='')}"
    url = f"{base}/messages?direction=forwards&limit=1000"
    out = []
    with httpx.Client(timeout=WAIT) as http:
        while url:
            response = http.get(url, headers={"Authorization": auth})
            assert response.status_code == 200, response.text
            for message in response.json():
                data = message.get("data", "")
                if message.get("encoding") == "base64":
                    data = base64.b64decode(data)
                elif isinstance(data, str):
                    data = data.encode()
                out.append((data, message))
            links = re.findall(r'<\./([^>]+)>; rel="next"', response.headers.get("link", ""))
            url = f"{base}/{links[0]}" if links else None
    return out


def test_paho_to_paho_and_ably(tern):
    """A paho QoS 1 publish reaches a paho subscriber and ably-python (realtime) as the
    same bytes, and is in history as binary data; the topic is the channel, `/` levels
    and an Ably namespace included."""
    topic = "py-mqtt:kitchen/temp"
    sub = Paho(tern, "sub-1")
    pub = Paho(tern, "pub-1")

    async def run():
        realtime = AblyRealtime(ROOT_KEY, endpoint=f"127.0.0.1:{tern.port}", tls=False)
        try:
            await realtime.connection.once_async("connected")
            received = []
            await realtime.channels.get(topic).subscribe(lambda m: received.append(m))
            assert sub.subscribe(topic, qos=1) == [1]
            info = pub.client.publish(topic, b"21.5\x00\xff", qos=1)
            await asyncio.get_running_loop().run_in_executor(None, lambda: wait(lambda: info.mid in pub.acked))
            await asyncio.get_running_loop().run_in_executor(None, lambda: wait(lambda: sub.messages and received))
            assert sub.messages == [(topic, b"21.5\x00\xff", 1)]
            assert bytes(received[0].data) == b"21.5\x00\xff"
        finally:
            await realtime.close()

    try:
        asyncio.run(run())
        assert [data for data, _ in history(tern, topic)] == [b"21.5\x00\xff"]
    finally:
        sub.close()
        pub.close()


def test_ably_to_paho_payloads(tern):
    """ably-python's string, bytes and JSON data reach a paho subscriber as UTF-8 text,
    the same bytes and JSON text, over both of ably-python's protocols."""
    sub = Paho(tern, "sub-2")
    try:
        assert sub.subscribe("py-mqtt-in", qos=0) == [0]

        async def run():
            for binary in (False, True):
                rest = AblyRest(ROOT_KEY, endpoint="127.0.0.1", port=tern.port, tls=False,
                                use_binary_protocol=binary, use_token_auth=True)
                try:
                    channel = rest.channels.get("py-mqtt-in")
                    await channel.publish("t", "héllo")
                    await channel.publish("b", b"\x00\x01\xfe")
                    await channel.publish("j", {"a": [1, 2]})
                finally:
                    await rest.close()

        asyncio.run(run())
        wait(lambda: len(sub.messages) == 6)
        payloads = [payload for _, payload, _ in sub.messages]
        for i in (0, 3):
            assert payloads[i] == "héllo".encode()
            assert payloads[i + 1] == b"\x00\x01\xfe"
            assert json.loads(payloads[i + 2]) == {"a": [1, 2]}
        assert all(qos == 0 for _, _, qos in sub.messages)
    finally:
        sub.close()


def test_credentials_get_connack_codes(tern):
    """Key name and secret connect (0); a wrong secret, an unknown key and a bad token
    get 4 (bad user name or password); no credentials get 5 (not authorized)."""
    for username, password, code in [
        (KEY_NAME, KEY_SECRET, 0),
        (KEY_NAME, "wrong", 4),
        ("test.nokey", KEY_SECRET, 4),
        ("not-a-token", "", 4),
        (None, None, 5),
    ]:
        sock, got = raw_connect(tern, username, password)
        assert got == code, (username, password)
        if code:
            assert closed_by_server(sock, 2)
        sock.close()
    # paho sees the same.
    refused = Paho(tern, "bad", KEY_NAME, "wrong")
    try:
        assert refused.connected.wait(WAIT)
        assert refused.reason.value == 134  # paho's name for 3.1.1's code 4
    finally:
        refused.client.loop_stop()


def test_token_as_user_name(tern):
    """A token (from the key's requestToken) as user name with an empty password
    connects and may publish."""

    async def token():
        rest = AblyRest(ROOT_KEY, endpoint="127.0.0.1", port=tern.port, tls=False, use_token_auth=True)
        try:
            return (await rest.auth.request_token()).token
        finally:
            await rest.close()

    sock, code = raw_connect(tern, asyncio.run(token()), "")
    try:
        assert code == 0
        sock.sendall(publish_packet("py-mqtt-token", b"t", qos=1, packet_id=9))
        assert read_packet(sock) == (0x40, b"\x00\x09")
    finally:
        sock.close()
    assert [data for data, _ in history(tern, "py-mqtt-token")] == [b"t"]


def test_capabilities_and_wildcards(tern):
    """Subscriptions outside the capability, with wildcards or over the per-connection
    limit get SUBACK 0x80 beside granted ones (QoS 2 granted as 1); a PUBLISH outside
    the capability closes the connection and stores nothing."""
    sock, code = raw_connect(tern, *LIMITED_KEY.split(":"))
    try:
        assert code == 0
        sock.sendall(subscribe_packet(5, [("allowed:a", 2), ("other", 0), ("allowed:#", 0),
                                          ("allowed:+/x", 1), ("allowed:b", 0),
                                          ("allowed:c", 1), ("allowed:d", 0)]))
        assert read_packet(sock) == (0x90, b"\x00\x05" + bytes([1, 0x80, 0x80, 0x80, 0, 1, 0x80]))
        sock.sendall(publish_packet("other", b"nope", qos=1, packet_id=1))
        assert closed_by_server(sock, 2)
    finally:
        sock.close()
    assert history(tern, "other") == []


def test_oversize_packets_are_refused(tern):
    """A packet over packet_bytes_max, and a payload over max_message_size, close the
    connection without a PUBACK and store nothing; one at the limit is stored."""
    for payload, stored in [
        (b"x" * (PACKET_BYTES_MAX + 1), False),
        (b"x" * (MAX_MESSAGE_SIZE + 1), False),
        (b"x" * MAX_MESSAGE_SIZE, True),
    ]:
        channel = f"py-mqtt-size-{len(payload)}"
        sock, _ = raw_connect(tern)
        try:
            try:
                sock.sendall(publish_packet(channel, payload, qos=1, packet_id=1))
            except OSError:
                pass  # closed while the packet was still being sent
            if stored:
                assert read_packet(sock) == (0x40, b"\x00\x01")
            else:
                with pytest.raises(ConnectionError):
                    read_packet(sock)
        finally:
            sock.close()
        assert len(history(tern, channel)) == (1 if stored else 0)


def test_malformed_and_unexpected_packets_close(tern):
    """A reserved packet type, a second CONNECT and a QoS 2 PUBLISH close the
    connection; the server keeps serving."""
    for bad in [b"\xf0\x00", connect_packet("again", KEY_NAME, KEY_SECRET),
                publish_packet("py-mqtt-q2", b"x", qos=2, packet_id=1)]:
        sock, _ = raw_connect(tern)
        try:
            sock.sendall(bad)
            assert closed_by_server(sock, 2), bad
        finally:
            sock.close()
    sock, code = raw_connect(tern)
    assert code == 0
    sock.close()


def test_keep_alive_and_ping(tern):
    """PINGREQ gets PINGRESP; a client silent for 1.5 x its keep-alive is disconnected,
    and not before its keep-alive."""
    sock, _ = raw_connect(tern, keepalive=1)
    try:
        sock.sendall(b"\xc0\x00")
        assert read_packet(sock) == (0xD0, b"")
        started = time.time()
        assert closed_by_server(sock, 5)
        assert 1.0 <= time.time() - started <= 3.0
    finally:
        sock.close()


def test_last_will(tern):
    """The will is published when a connection ends without DISCONNECT, not after one."""
    watcher = Paho(tern, "watcher")
    try:
        assert watcher.subscribe("py-mqtt-will", qos=0) == [0]
        polite, _ = raw_connect(tern, will=("py-mqtt-will", b"polite"), client_id="polite")
        polite.sendall(b"\xe0\x00")
        polite.close()
        rude, _ = raw_connect(tern, will=("py-mqtt-will", b"gone"), client_id="rude")
        rude.close()
        wait(lambda: watcher.messages)
        time.sleep(0.3)
        assert [payload for _, payload, _ in watcher.messages] == [b"gone"]
    finally:
        watcher.close()


def test_puback_only_after_commit_survives_a_kill():
    """QoS 1 publishes pipelined on one connection while the server is SIGKILLed: after a
    restart every PUBACKed message is in history exactly once (0 lost, 0 duplicated),
    and PUBACKs came in publish order."""
    total = 3000
    with tempfile.TemporaryDirectory() as workdir:
        server = MqttTern(workdir).start()
        acked = []
        try:
            sock, code = raw_connect(server)
            assert code == 0
            sender = threading.Thread(target=lambda: send_all(sock, total), daemon=True)
            sender.start()
            sock.settimeout(WAIT)
            try:
                while len(acked) < total:
                    first, body = read_packet(sock)
                    assert first == 0x40
                    acked.append(int.from_bytes(body, "big"))
                    if len(acked) == total // 3:
                        server.kill()
            except (ConnectionError, OSError):
                pass
            sock.close()
            assert total // 3 <= len(acked) < total, len(acked)
            assert acked == list(range(1, len(acked) + 1)), "PUBACKs in publish order"
            server.start()
            stored = [data.decode() for data, _ in history(server, "py-mqtt-kill")]
        finally:
            server.stop()
    assert len(stored) == len(set(stored)), "no message stored twice"
    missing = [i for i in acked if f"m{i}" not in set(stored)]
    assert missing == [], f"{len(missing)} PUBACKed messages lost"


def send_all(sock, total):
    try:
        for i in range(1, total + 1):
            sock.sendall(publish_packet("py-mqtt-kill", f"m{i}".encode(), qos=1, packet_id=i))
    except OSError:
        pass


def publish_rest(tern, channel, datas):
    async def run():
        rest = AblyRest(ROOT_KEY, endpoint="127.0.0.1", port=tern.port, tls=False, use_token_auth=True)
        try:
            for data in datas:
                await rest.channels.get(channel).publish("n", data)
        finally:
            await rest.close()

    asyncio.run(run())


def test_persistent_session_redelivers_after_a_cut(tern):
    """A persistent session cut with QoS 1 messages unacknowledged: on reconnect
    (session present) they come again with DUP and their packet ids, then exactly what
    was published meanwhile, once each; a clean reconnect then discards the session."""
    channel = "py-mqtt-persist"
    sock, _ = raw_connect(tern, client_id="persist-1", clean=False)
    sock.sendall(subscribe_packet(1, [(channel, 1)]))
    assert read_packet(sock) == (0x90, b"\x00\x01\x01")
    publish_rest(tern, channel, ["m1", "m2", "m3"])
    first = [read_publish(sock) for _ in range(3)]
    assert [(dup, payload) for dup, _, _, _, payload in first] == [(False, b"m1"), (False, b"m2"), (False, b"m3")]
    sock.sendall(puback(first[0][2]))
    time.sleep(0.2)
    sock.close()  # the cut: m2 and m3 unacknowledged
    publish_rest(tern, channel, ["m4", "m5"])
    sock, _ = raw_connect(tern, client_id="persist-1", clean=False, session_present=True)
    try:
        again = [read_publish(sock) for _ in range(4)]
        for _, _, packet_id, _, _ in again:
            sock.sendall(puback(packet_id))
        assert [(dup, payload) for dup, _, _, _, payload in again] == [
            (True, b"m2"), (True, b"m3"), (False, b"m4"), (False, b"m5")]
        assert [packet_id for _, _, packet_id, _, _ in again[:2]] == [first[1][2], first[2][2]]
        assert all(topic == channel and qos == 1 for _, qos, _, topic, _ in again)
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            read_packet(sock)  # nothing more: no duplicates
    finally:
        sock.close()
    sock, _ = raw_connect(tern, client_id="persist-1", clean=True, session_present=False)
    sock.close()
    publish_rest(tern, channel, ["m6"])
    sock, _ = raw_connect(tern, client_id="persist-1", clean=False, session_present=False)
    try:
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            read_packet(sock)  # the clean connect discarded the subscription
    finally:
        sock.close()


def test_same_client_id_supersedes_the_live_connection(tern):
    """A CONNECT with the client id of a live connection closes that one, and takes its
    persistent session (subscriptions included)."""
    channel = "py-mqtt-takeover"
    old, _ = raw_connect(tern, client_id="takeover", clean=False)
    old.sendall(subscribe_packet(1, [(channel, 1)]))
    assert read_packet(old) == (0x90, b"\x00\x01\x01")
    new, _ = raw_connect(tern, client_id="takeover", clean=False, session_present=True)
    try:
        assert closed_by_server(old, 3)
        publish_rest(tern, channel, ["after"])
        _, _, packet_id, _, payload = read_publish(new)
        assert payload == b"after"
        new.sendall(puback(packet_id))
    finally:
        old.close()
        new.close()


def test_resumed_session_is_held_to_the_new_credential(tern):
    """A persistent session taken back with another credential of the app gets neither
    unacknowledged messages nor subscriptions of channels that credential may not read."""
    channel = "py-mqtt-secret"
    sock, _ = raw_connect(tern, client_id="shared", clean=False)
    sock.sendall(subscribe_packet(1, [(channel, 1)]))
    assert read_packet(sock) == (0x90, b"\x00\x01\x01")
    publish_rest(tern, channel, ["s1"])
    assert read_publish(sock)[4] == b"s1"
    sock.close()  # s1 unacknowledged
    publish_rest(tern, channel, ["s2"])
    sock, code = raw_connect(tern, *LIMITED_KEY.split(":"), client_id="shared", clean=False,
                             session_present=True)
    try:
        assert code == 0
        publish_rest(tern, channel, ["s3"])
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            read_packet(sock)
    finally:
        sock.close()


def test_mqtt_over_websocket(tern):
    """paho over WebSocket (path /mqtt, subprotocol mqtt, on the MQTT port) publishes
    QoS 1 to a TCP subscriber and subscribes to what ably-python publishes."""
    ws = Paho(tern, "ws-1", transport="websockets")
    tcp = Paho(tern, "tcp-1")
    try:
        assert ws.connected.wait(WAIT) and ws.reason.value == 0
        assert tcp.subscribe("py-mqtt-ws", qos=1) == [1]
        assert ws.subscribe("py-mqtt-ws-in", qos=1) == [1]
        info = ws.client.publish("py-mqtt-ws", b"over ws \x00", qos=1)
        wait(lambda: info.mid in ws.acked and tcp.messages)
        assert tcp.messages == [("py-mqtt-ws", b"over ws \x00", 1)]
        publish_rest(tern, "py-mqtt-ws-in", ["from ably"])
        wait(lambda: ws.messages)
        assert ws.messages == [("py-mqtt-ws-in", b"from ably", 1)]
    finally:
        ws.close()
        tcp.close()


def test_publish_rate_slows_the_sender_without_dropping():
    """Past inbound_frames_per_second the connection is not read until the second is
    over: 150 QoS 0 publishes sent at once at 50/s take two more seconds to be taken,
    and all of them are stored."""
    config = CONFIG.replace("[limits]\n", "[limits]\ninbound_frames_per_second = 50\n")
    with tempfile.TemporaryDirectory() as workdir:
        server = MqttTern(workdir, config).start()
        try:
            sock, _ = raw_connect(server)
            burst = b"".join(publish_packet("py-mqtt-rate", f"r{i}".encode()) for i in range(150))
            started = time.time()
            sock.sendall(burst + b"\xc0\x00")
            assert read_packet(sock) == (0xD0, b"")
            assert time.time() - started >= 1.9
            sock.close()
            wait(lambda: len(history(server, "py-mqtt-rate")) == 150)
            stored = [data for data, _ in history(server, "py-mqtt-rate")]
            assert stored == [f"r{i}".encode() for i in range(150)]
        finally:
            server.stop()


def test_connections_count_against_connections_max():
    """MQTT connections count against limits.connections_max: past it a connection gets
    CONNACK 3 (server unavailable); once one closes, a new one is accepted."""
    config = CONFIG.replace("[limits]\n", "[limits]\nconnections_max = 2\n")
    with tempfile.TemporaryDirectory() as workdir:
        server = MqttTern(workdir, config).start()
        try:
            first, _ = raw_connect(server, client_id="c1")
            second, _ = raw_connect(server, client_id="c2")
            third, code = raw_connect(server, client_id="c3")
            assert code == 3
            assert closed_by_server(third, 2)
            third.close()
            first.close()
            deadline = time.time() + WAIT
            while True:
                again, code = raw_connect(server, client_id="c4")
                again.close()
                if code == 0 or time.time() > deadline:
                    break
                time.sleep(0.05)
            assert code == 0
            second.close()
        finally:
            server.stop()


class Region:
    def __init__(self, port, mqtt_port):
        self.port, self.mqtt_port = port, mqtt_port


def start_dev(workdir):
    """`tern dev --port 0` (three regions): the process and each region's ports."""
    proc = subprocess.Popen([TERN_BIN, "dev", "--port", "0"], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, TERN_LOG=os.environ.get("TERN_LOG", "warn")))
    regions, mqtt_port, deadline = [], None, time.time() + 30
    while len(regions) < 3 and time.time() < deadline:
        line = proc.stdout.readline() or ""
        if match := re.search(r"mqtt listening on 127\.0\.0\.1:(\d+)", line):
            mqtt_port = int(match.group(1))
        elif match := re.search(r"^tern listening on http://127\.0\.0\.1:(\d+)", line):
            regions.append(Region(int(match.group(1)), mqtt_port))
        if proc.poll() is not None:
            break
    assert len(regions) == 3, "tern dev did not start"
    return proc, regions


def test_persistent_session_moves_to_another_region():
    """A persistent session cut in one region and resumed in another: the new region
    takes the session over from the old one (session present), sends the unacknowledged
    message again with DUP, then exactly what was published meanwhile, once each."""
    dev_key = "dev.root:dev-secret-change-me"
    user, password = dev_key.split(":")
    channel = "py-mqtt-roam"

    def publish(region, datas):
        async def run():
            rest = AblyRest(dev_key, endpoint="127.0.0.1", port=region.port, tls=False, use_token_auth=True)
            try:
                for data in datas:
                    await rest.channels.get(channel).publish("n", data)
            finally:
                await rest.close()

        asyncio.run(run())

    with tempfile.TemporaryDirectory() as workdir:
        proc, (east, west, _) = start_dev(workdir)
        try:
            sock, _ = raw_connect(east, user, password, client_id="roamer", clean=False)
            sock.sendall(subscribe_packet(1, [(channel, 1)]))
            assert read_packet(sock) == (0x90, b"\x00\x01\x01")
            publish(east, ["r1", "r2"])
            first = [read_publish(sock) for _ in range(2)]
            sock.sendall(puback(first[0][2]))
            time.sleep(0.2)
            sock.close()  # r2 unacknowledged
            publish(east, ["r3"])
            sock, _ = raw_connect(west, user, password, client_id="roamer", clean=False,
                                  session_present=True)
            try:
                again = [read_publish(sock) for _ in range(2)]
                for _, _, packet_id, _, _ in again:
                    sock.sendall(puback(packet_id))
                assert [(dup, payload) for dup, _, _, _, payload in again] == [(True, b"r2"), (False, b"r3")]
                assert again[0][2] == first[1][2], "the same packet id"
                publish(east, ["r4"])
                live = read_publish(sock)
                assert live[4] == b"r4"
                sock.sendall(puback(live[2]))
                sock.settimeout(0.5)
                with pytest.raises(socket.timeout):
                    read_packet(sock)  # nothing twice
            finally:
                sock.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
