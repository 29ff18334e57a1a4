"""Starts a tern for the Python interop tests (same contract as the JS suite)."""
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TERN_BIN = os.environ.get("TERN_BIN", str(REPO / "target" / "debug" / "tern"))
ROOT_KEY = "test.root:rootsecret"

CONFIG = """
[server]
host = "127.0.0.1"
port = 0

[history]
mode = "redb"
path = "history.redb"

[[apps]]
id = "test"

[[apps.keys]]
id = "root"
secret = "rootsecret"
capability = '{"*":["*"]}'
"""


class Tern:
    """A `tern serve` from `config` (TOML text) in `workdir`; restartable on the same data
    directory. `port` is its client port (http or https), `mqtt_port` its MQTT port if
    `[mqtt]` is enabled (printed before the client port line)."""

    def __init__(self, workdir, config=CONFIG):
        self.workdir = workdir
        self.config = config
        self.proc = None
        self.port = None
        self.mqtt_port = None

    def start(self, port=0):
        config = Path(self.workdir) / "tern.toml"
        config.write_text(self.config)
        env = dict(os.environ, TERN_LOG=os.environ.get("TERN_LOG", "warn"))
        self.proc = subprocess.Popen(
            [TERN_BIN, "serve", "--config", str(config), "--port", str(port)],
            cwd=self.workdir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        deadline = time.time() + 20
        while time.time() < deadline:
            line = self.proc.stdout.readline() or ""
            match = re.search(r"mqtt listening on 127\.0\.0\.1:(\d+)", line)
            if match:
                self.mqtt_port = int(match.group(1))
            match = re.search(r"listening on https?://127\.0\.0\.1:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                break
        raise RuntimeError("tern did not start")

    def kill(self):
        """SIGKILL: nothing is flushed (only this child's PID)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self):
        """SIGTERM, then SIGKILL after 3 s; only this child's PID."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def tern():
    with tempfile.TemporaryDirectory() as workdir:
        server = Tern(workdir).start()
        yield server
        server.stop()
