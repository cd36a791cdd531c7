"""The labeling tools' own environment (.venv/tools: label-studio, label-studio-sdk, fiftyone, built by `make
test`), whose pins clash with the service's, so tests reach it through subprocesses."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".venv" / "tools" / "bin"
PYTHON = TOOLS / "python"


def require_tools() -> None:
    if not PYTHON.exists():
        pytest.fail(f"{PYTHON} is missing: run `make venv` (it builds the labeling tools' environment)")


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str], log: Path, ready_url: str, timeout: float):
    """A subprocess with its output in `log`, up once `ready_url` answers 200; stopped (by its pid) at the
    end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args[0]} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_inner_pytest(path: str, env: dict[str, str]) -> None:
    """Run a check module under the tools' own pytest (without the service's conftest, which needs torch)."""
    require_tools()
    r = subprocess.run([str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--confcutdir",
                        str(ROOT / "tests" / "integrations"), str(ROOT / path)], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    sys.stdout.write(r.stdout[-5000:])
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
