"""GOMP_SPINCOUNT for the server process: set before torch loads, and never over the user's own value."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.openmp import limit_openmp_spin

ROOT = Path(__file__).resolve().parent.parent


def test_sets_the_spin_count_unless_the_environment_has_one():
    env: dict[str, str] = {}
    assert limit_openmp_spin(10_000, env) and env == {"GOMP_SPINCOUNT": "10000"}
    env = {"GOMP_SPINCOUNT": "300000"}
    assert not limit_openmp_spin(10_000, env) and env["GOMP_SPINCOUNT"] == "300000"
    env = {}
    assert not limit_openmp_spin(None, env) and env == {}


def _served_environment(extra_env: dict[str, str]) -> list[str]:
    """Run `python -m service`'s main with uvicorn.run replaced by a probe; what the probe saw."""
    probe = (
        "import os, sys, uvicorn\n"
        "uvicorn.run = lambda app, **kw: print('spin', os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)\n"
        "from service.__main__ import main\n"
        "print('torch before main', 'torch' in sys.modules)\n"
        "main(['--port', '0'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env.update({"SALIENCY_MODELS": '["tiny_cnn"]', **extra_env})
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return out.stdout.splitlines()


def test_the_server_sets_it_before_torch_loads():
    # libgomp reads GOMP_SPINCOUNT once, when torch loads it: the entry point must not import torch first.
    assert _served_environment({}) == ["torch before main False", "spin 10000 True"]


def test_the_setting_and_the_environment_choose():
    assert _served_environment({"SALIENCY_OPENMP_SPIN_COUNT": "null"})[-1] == "spin None True"
    assert _served_environment({"GOMP_SPINCOUNT": "5"})[-1] == "spin 5 True"
