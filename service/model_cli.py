"""`python -m service check-model NAME_OR_CARD`: load one model as the server would and run its full
self-test (service/selftest.py); exit status 0 when it loads and every method that applies keeps its
invariants, 1 otherwise, saying why."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .settings import Settings


def check_model_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service check-model", description=__doc__)
    parser.add_argument("model", help="a card's name in the models directories, or a path to a card (.toml)")
    parser.add_argument("--models-dir", help="directory of model cards (default: the server's setting)")
    parser.add_argument("--device", help="auto, cpu, cuda, ... (default: the server's setting)")
    parser.add_argument("--json", action="store_true", help="the report as JSON")
    return parser


def check_model(argv: list[str]) -> int:
    args = check_model_parser().parse_args(argv)
    overrides = {k: v for k, v in (("models_dir", args.models_dir), ("device", args.device)) if v is not None}
    settings = Settings(**overrides)

    from .selftest import describe, full_self_test  # torch: imported once the arguments are good
    from .zoo import resolve_device
    from .zoo.cards import CardError, find_cards, read_card
    from .zoo.registry import load_model

    device = resolve_device(settings.device)
    try:
        card, base = _find(args.model, settings, find_cards, read_card)
        model = load_model(card, base, device, settings.fold_batchnorm)
        built = load_model(card, base, device, fold_norms=False).module
    except CardError as exc:
        print(f"{args.model}: cannot load: {exc}", file=sys.stderr)
        return 1
    except LookupError as exc:
        print(f"{args.model}: {exc}", file=sys.stderr)
        return 1
    report = full_self_test(model, built)
    print(json.dumps(report.as_dict(), indent=2) if args.json else "\n".join(describe(report)))
    return 0 if report.passed else 1


def _find(name: str, settings: Settings, find_cards, read_card):
    given = Path(name)
    if given.suffix == ".toml":
        if not given.is_file():
            raise LookupError(f"no card file {given}")
        return read_card(given), given.parent
    found = None
    for entry in find_cards(list(settings.card_dirs)):
        if entry.card is not None and entry.card.name == name:
            found = (entry.card, entry.base)
        elif entry.card is None and entry.error is not None and entry.error.card == name:
            raise entry.error
    if found is None:
        names = sorted(e.card.name for e in find_cards(list(settings.card_dirs)) if e.card is not None)
        raise LookupError(f"unknown model {name!r}; the models directories hold {names}")
    return found
