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
    def __init__(self, workdir):
        self.workdir = workdir
        self.proc = None
        self.port = None

    def start(self, port=0):
        config = Path(self.workdir) / "tern.toml"
        config.write_text(CONFIG)
        env = dict(os.environ, TERN_LOG=os.environ.get("TERN_LOG", "warn"))
        self.proc = subprocess.Popen(
            [TERN_BIN, "serve", "--config", str(config), "--port", str(port)],
            cwd=self.workdir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        deadline = time.time() + 20
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line or "")
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                break
        raise RuntimeError("tern did not start")

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
