"""Seeds the mqtt_packets corpus with real client traffic: paho-mqtt (tests/python's
pinned version) talks to a `tern dev --regions 1` through a relay on loopback that
records what the client sends. Each connection's whole byte stream is one seed, and
each of its packets another.

    target/interop-venv/bin/python fuzz/seeds/mqtt.py   # after cargo build -p tern-server

Writes fuzz/corpus/mqtt_packets/paho-*, replacing earlier ones."""
import hashlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

REPO = Path(__file__).resolve().parents[2]
TERN_BIN = os.environ.get("TERN_BIN", str(REPO / "target" / "debug" / "tern"))
CORPUS = REPO / "fuzz" / "corpus" / "mqtt_packets"
KEY_NAME, KEY_SECRET = "dev.root", "dev-secret-change-me"


class Relay:
    """Forwards every accepted connection to `upstream`, recording what clients send."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.streams = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.upstream)
            recorded = bytearray()
            self.streams.append(recorded)
            threading.Thread(target=pipe, args=(client, server, recorded), daemon=True).start()
            threading.Thread(target=pipe, args=(server, client, None), daemon=True).start()


def pipe(source, sink, recorded):
    try:
        while data := source.recv(65536):
            if recorded is not None:
                recorded.extend(data)
            sink.sendall(data)
    except OSError:
        pass
    for end in (source, sink):
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def packets(stream):
    """Splits a recorded stream at MQTT packet boundaries."""
    out, at = [], 0
    while at + 2 <= len(stream):
        length, shift, i = 0, 0, at + 1
        while True:
            byte = stream[i]
            length += (byte & 0x7F) << shift
            shift += 7
            i += 1
            if not byte & 0x80:
                break
        out.append(bytes(stream[at:i + length]))
        at = i + length
    return out


def traffic(port):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="seed-client",
                         protocol=mqtt.MQTTv311)
    client.username_pw_set(KEY_NAME, KEY_SECRET)
    client.will_set("seed/will", b"gone", qos=1)
    received = []
    client.on_message = lambda c, u, m: received.append(m.payload)
    client.connect("127.0.0.1", port, keepalive=5)
    client.loop_start()
    client.subscribe([("seed/a", 1), ("chat:room/b", 0), ("seed/#", 0)])
    client.publish("seed/a", b"qos1 \x00\xff", qos=1).wait_for_publish(5)
    client.publish("chat:room/b", "qos0 text", qos=0)
    client.publish("seed/a", b"", qos=1, retain=True).wait_for_publish(5)
    deadline = time.time() + 5
    while len(received) < 3 and time.time() < deadline:
        time.sleep(0.02)
    client.unsubscribe(["seed/a", "chat:room/b"])
    time.sleep(0.2)
    client.disconnect()
    client.loop_stop()
    # A token login and a refused one.
    for username, password in [("not-a-token", ""), (KEY_NAME, "wrong")]:
        refused = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv311)
        refused.username_pw_set(username, password)
        try:
            refused.connect("127.0.0.1", port)
            refused.loop(1)
        except OSError:
            pass
        refused.disconnect()


def main():
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen([TERN_BIN, "dev", "--regions", "1", "--port", "0"], cwd=workdir,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            mqtt_port = None
            while mqtt_port is None:
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError("tern dev did not start")
                match = re.search(r"mqtt listening on 127\.0\.0\.1:(\d+)", line)
                if match:
                    mqtt_port = int(match.group(1))
            relay = Relay(("127.0.0.1", mqtt_port))
            traffic(relay.port)
            time.sleep(0.3)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    CORPUS.mkdir(parents=True, exist_ok=True)
    for old in CORPUS.glob("paho-*"):
        old.unlink()
    seeds = set()
    for stream in relay.streams:
        seeds.add(bytes(stream))
        seeds.update(packets(stream))
    for seed in seeds:
        (CORPUS / f"paho-{hashlib.sha256(seed).hexdigest()[:16]}").write_bytes(seed)
    print(f"wrote {len(seeds)} seeds to {CORPUS}")


if __name__ == "__main__":
    main()
