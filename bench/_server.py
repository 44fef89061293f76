"""A ``sampler-core serve`` subprocess for the benchmarks (its own process: no shared GIL)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def running_server(*options: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start the server on an ephemeral localhost port; yield (process, host); stop it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sampler_core.cli", "serve", "--port", "0", "--data-dir",
         tempfile.mkdtemp(prefix="sampler-bench-"), *options], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            match = re.match(r"listening on .*:(\d+)$", line.strip())
            if match:
                yield proc, f"localhost:{match.group(1)}"
                return
        raise RuntimeError("the server did not start")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
