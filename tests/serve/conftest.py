"""Fixtures of the server tests: an in-process app on a tiny model, and a real `aurl serve`."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def tiny_model(seed: int = 0):
    """A random tiny model (dim 32, 2 layers): fast, and its output still obeys the grammar."""
    import torch

    from aurl.config import ModelConfig, VocabConfig
    from aurl.models import MusicTransformerVAEGAN

    torch.manual_seed(seed)
    config = dataclasses.replace(
        ModelConfig(), d_model=32, n_layers=2, n_heads=2, dropout=0.0, max_seq_len=256
    )
    return MusicTransformerVAEGAN(config, VocabConfig()).eval()


@pytest.fixture(scope="module")
def tiny():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `aurl serve` runs: threads only contend when decoding
    yield tiny_model()
    torch.set_num_threads(threads)


def make_client(tmp_path: Path, models: dict, composers: dict | None = None, **settings):
    """A TestClient on a fresh app (the caller uses it as a context manager); ``composers``:
    as :func:`aurl.serve.app.create_app`'s."""
    from fastapi.testclient import TestClient

    from aurl.serve.app import Settings, create_app
    from aurl.serve.engine import Limits

    class LoopbackClient(TestClient):
        """HTTP and WebSockets at 127.0.0.1 (TestClient's sockets say ``Host: testserver``,
        which a loopback server refuses)."""

        def websocket_connect(self, url: str, *args, **kwargs):
            from urllib.parse import urljoin

            return super().websocket_connect(urljoin("ws://127.0.0.1", url), *args, **kwargs)

    limits = Limits(**settings.pop("limits", {}))
    s = Settings(limits=limits, db=tmp_path / "listen.sqlite", **settings)
    return LoopbackClient(create_app(models, s, composers), base_url="http://127.0.0.1")


@pytest.fixture
def client(tmp_path, tiny):
    with make_client(tmp_path, {"tiny": tiny}) as c:
        yield c


class LiveServer:
    """`aurl serve --port 0` in a subprocess, with the shipped model (or ``args``' models)."""

    def __init__(self, db: Path, args: tuple[str, ...] = ()) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        self.db = db
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aurl", "serve", "--port", "0", "--db", str(db), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        line = self.proc.stdout.readline()  # the address line, printed once it listens
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"aurl serve did not start: {line}{self.proc.stdout.read()}")
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        import httpx

        for _ in range(200):
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("aurl serve never answered /api/health")

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("live") / "listen.sqlite")
    yield server
    server.stop()
