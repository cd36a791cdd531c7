"""python -m service: serve the API with uvicorn (flags override SALIENCY_* environment settings)."""
from __future__ import annotations

import argparse
import logging
import math
import sys

# Only light modules above: the arguments are parsed before torch (by way of the app) is imported, so
# `--help` and a mistyped flag answer at once (tests/test_main_cli.py).
from .settings import Settings

# The common settings that are also flags: name -> type. Each flag's help is its setting's description.
FLAGS: dict[str, type] = {"host": str, "port": int, "models_dir": str, "device": str, "max_batch_cost": int,
                          "max_wait_ms": float, "max_queue": int}
_OWN_HELP = {"port": "TCP port to listen on"}  # settings whose field has no description


def _help(name: str) -> str:
    field = Settings.model_fields[name]
    text = field.description or _OWN_HELP[name]
    return f"{text} (default: {field.default}; env SALIENCY_{name.upper()})".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__,
                                     epilog="other commands (each with --help): python -m service "
                                            "check-model NAME_OR_CARD (load a model and run its self-test); "
                                            "python -m service add-model ARCH --weights FILE [--name NAME] "
                                            "(write a model's card, then self-test it)")
    for name, kind in FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, help=_help(name))
    parser.add_argument("--engine", choices=["embedded", "ray"], default="embedded",
                        help="embedded: the in-process worker queue (default); ray: the same API on "
                             "Ray Serve, on a local Ray or the cluster named by RAY_ADDRESS "
                             "(needs `pip install .[ray]`)")
    return parser


# Commands beside serving: `python -m service COMMAND ...` (serving takes no positional argument).
COMMANDS = {"check-model": "check_model", "add-model": "add_model"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        from . import model_cli

        sys.exit(getattr(model_cli, COMMANDS[argv[0]])(argv[1:]))
    args = build_parser().parse_args(argv)
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
    import uvicorn

    from .app import create_app  # imports torch: seconds

    # On SIGTERM uvicorn stops accepting, lets in-flight requests finish (up to the grace), then the
    # lifespan stops the worker and cancels jobs.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s))


if __name__ == "__main__":
    main()
