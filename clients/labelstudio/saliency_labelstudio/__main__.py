"""python -m saliency_labelstudio --port 9090: serve the ML backend (settings from the environment)."""
from __future__ import annotations

import argparse

import uvicorn

from .app import create_app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="saliency-labelstudio", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
