"""python -m service: serve the API with uvicorn (flags override SALIENCY_* environment settings)."""
from __future__ import annotations

import argparse
import logging
import math

import uvicorn

from .app import create_app
from .settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int)
    parser.add_argument("--models-dir", help="directory of model cards")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--max-batch-cost", type=int)
    parser.add_argument("--max-wait-ms", type=float)
    parser.add_argument("--max-queue", type=int)
    parser.add_argument("--engine", choices=["embedded", "ray"], default="embedded",
                        help="embedded: the in-process worker queue (default); ray: the same API on "
                             "Ray Serve, on a local Ray or the cluster named by RAY_ADDRESS "
                             "(needs `pip install .[ray]`)")
    args = parser.parse_args(argv)
    engine = args.engine
    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "engine"}
    settings = Settings(**overrides)
    settings.check_bind()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if engine == "ray":
        from .distributed.app import serve_forever

        serve_forever(settings)
        return
    # On SIGTERM uvicorn stops accepting, lets in-flight requests finish (up to the grace), then the
    # lifespan stops the worker and cancels jobs.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s))


if __name__ == "__main__":
    main()
