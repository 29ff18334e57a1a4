"""ably-python over TLS with plain Basic auth (which it refuses over plain HTTP): tern
serves `[server.tls]` with a certificate from `tern certs --edge-names`, and Python
trusts its CA through SSL_CERT_FILE, as a user would."""
import asyncio
import subprocess
import tempfile
from pathlib import Path

from ably import AblyRealtime, AblyRest

from conftest import ROOT_KEY, TERN_BIN, Tern

CONFIG = """
[server]
host = "127.0.0.1"
port = 0
tls = {{ cert = "{cert}", key = "{key}" }}

[history]
mode = "memory"

[[apps]]
id = "test"

[[apps.keys]]
id = "root"
secret = "rootsecret"
capability = '{{"*":["*"]}}'
"""


def test_basic_auth_over_tls(monkeypatch):
    """REST publish with Basic auth and a realtime subscriber over wss://, both with
    certificate verification against the throwaway CA."""
    with tempfile.TemporaryDirectory() as workdir:
        subprocess.run([TERN_BIN, "certs", "--out", workdir, "--edge-names", "localhost,127.0.0.1"],
                       check=True, capture_output=True)
        config = CONFIG.format(cert=Path(workdir) / "edge.pem", key=Path(workdir) / "edge.key")
        server = Tern(workdir, config).start()
        try:
            port = server.port
            monkeypatch.setenv("SSL_CERT_FILE", str(Path(workdir) / "edge-ca.pem"))

            async def run():
                rest = AblyRest(ROOT_KEY, endpoint="localhost", tls=True, tls_port=port)
                realtime = AblyRealtime(ROOT_KEY, endpoint=f"localhost:{port}", tls=True)
                try:
                    await realtime.connection.once_async("connected")
                    received = []
                    await realtime.channels.get("py-tls").subscribe(lambda m: received.append(m.data))
                    await rest.channels.get("py-tls").publish("n", "basic auth over tls")
                    for _ in range(200):
                        if received:
                            break
                        await asyncio.sleep(0.02)
                    assert received == ["basic auth over tls"]
                    history = await rest.channels.get("py-tls").history()
                    assert [m.data for m in history.items] == ["basic auth over tls"]
                finally:
                    await realtime.close()
                    await rest.close()

            asyncio.run(run())
        finally:
            server.stop()
