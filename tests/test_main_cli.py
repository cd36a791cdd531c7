"""`python -m service`: `--help` answers at once (the arguments are parsed before torch is imported) and
explains every flag."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from tests.conftest import ROOT


def test_help_answers_at_once_without_importing_torch():
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    elapsed = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert elapsed < 3, f"python -m service --help took {elapsed:.1f}s"
    traced = subprocess.run([sys.executable, "-X", "importtime", "-m", "service", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert traced.returncode == 0, traced.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in traced.stderr.splitlines()
                if line.startswith("import time:")}
    assert "service.settings" in imported  # the trace is read right
    assert not {m for m in imported if m.split(".")[0] in ("torch", "uvicorn", "fastapi")}
    from service.__main__ import build_parser

    for action in build_parser()._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        assert all(option in r.stdout for option in action.option_strings)


def test_every_flag_reaches_its_setting():
    from service.__main__ import build_parser

    args = build_parser().parse_args(["--port", "9001", "--max-wait-ms", "2.5", "--models-dir", "/m"])
    assert (args.port, args.max_wait_ms, args.models_dir, args.engine) == (9001, 2.5, "/m", "embedded")
