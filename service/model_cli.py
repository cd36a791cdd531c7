"""The model commands of `python -m service`:

- `check-model NAME_OR_CARD`: load one model as the server would and run its full self-test
  (service/selftest.py); exit status 0 when it loads and every method that applies keeps its invariants, 1
  otherwise, saying why.
- `add-model ARCH --weights FILE [--name NAME]`: write the card of a model (service/zoo/card_writer.py) into
  the models directory, its weights (and labels) beside it, once it loads and passes the full self-test; exit
  status 0 when it was added, 1 (and nothing written) otherwise, saying why.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from .settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    """The server's settings, with the command's --models-dir and --device over them."""
    overrides = {k: v for k, v in (("models_dir", args.models_dir), ("device", args.device)) if v is not None}
    return Settings(**overrides)


def check_model_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service check-model", description=__doc__)
    parser.add_argument("model", help="a card's name in the models directories, or a path to a card (.toml)")
    parser.add_argument("--models-dir", help="directory of model cards (default: the server's setting)")
    parser.add_argument("--device", help="auto, cpu, cuda, ... (default: the server's setting)")
    parser.add_argument("--json", action="store_true", help="the report as JSON")
    return parser


def check_model(argv: list[str]) -> int:
    args = check_model_parser().parse_args(argv)
    settings = _settings(args)

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


def add_model_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service add-model", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m service add-model timm:convnext_tiny --weights convnext_tiny.safetensors\n"
               "  python -m service add-model torchvision:resnet18 --weights resnet18.pth --name rn18\n"
               "  python -m service add-model hf:path/to/saved_model   (a save_pretrained folder; .[hf])")
    parser.add_argument("architecture",
                        help="timm:NAME, torchvision:NAME or hf:FOLDER (a Hugging Face image classifier "
                             "saved with save_pretrained)")
    parser.add_argument("--weights", help="the state dict: .safetensors, or a .pth/.pt of tensors only "
                                          "(never unpickled beyond tensors); hf: the folder's by default")
    parser.add_argument("--name", help="the card's name (default: from the architecture)")
    parser.add_argument("--description", default="", help="one line shown in GET /v1/models")
    parser.add_argument("--labels", help="class names, one per line (default: ImageNet-1k's for 1000 "
                                         "classes; an hf model's own id2label)")
    parser.add_argument("--num-classes", type=int,
                        help="classes of the head (default: read from the weights' last Linear layer)")
    parser.add_argument("--models-dir", help="where the card goes (default: the server's models directory, "
                                             "SALIENCY_MODELS_DIR)")
    parser.add_argument("--device", help="auto, cpu, cuda, ... for the self-test (default: the server's)")
    parser.add_argument("--replace", action="store_true", help="replace a card of the same name")
    return parser


def add_model(argv: list[str]) -> int:
    args = add_model_parser().parse_args(argv)
    settings = _settings(args)
    from .zoo.cards import CardError

    try:
        return _add(args, settings)
    except (CardError, LookupError, OSError) as exc:
        print(f"add-model {args.architecture}: not added: {exc}", file=sys.stderr)
        return 1


def _add(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError

    from .selftest import describe, full_self_test
    from .zoo import resolve_device
    from .zoo.adapters import build
    from .zoo.card_writer import card_name, classifier_width, write_card
    from .zoo.cards import CardError, LabelsSpec, ModelCard, WeightsSpec, find_cards, read_card
    from .zoo.registry import load_model
    from .zoo.weights import read_state_dict

    architecture: str = args.architecture
    name = args.name or card_name(architecture)
    target = Path(settings.models_dir)
    taken = {e.name: e.base for e in find_cards(list(settings.card_dirs))}
    if name in taken and not args.replace:
        raise LookupError(f"a card named {name!r} exists (in {taken[name]}); choose --name or --replace")
    hf = architecture.startswith("hf:")
    with tempfile.TemporaryDirectory(prefix="add-model-") as tmp:
        stage = Path(tmp)
        files: list[str] = []  # paths under the stage, copied into the models directory once all passed
        if hf:
            folder = Path(architecture[3:]).expanduser()
            if not (folder / "config.json").is_file():
                raise LookupError(f"{folder} is not a save_pretrained folder (no config.json)")
            rel = f"hf/{name}"
            shutil.copytree(folder, stage / rel)
            files.append(rel)
            weights_rel = f"{rel}/{Path(args.weights).name if args.weights else 'model.safetensors'}"
            if args.weights and not (stage / weights_rel).is_file():
                shutil.copyfile(args.weights, stage / weights_rel)
            architecture = f"hf:{rel}"
        else:
            if not args.weights:
                raise LookupError("--weights FILE is needed (the model's state dict)")
            source = Path(args.weights).expanduser()
            if not source.is_file():
                raise LookupError(f"no weights file {source}")
            suffix = ".safetensors" if source.suffix == ".safetensors" else ".pth"
            weights_rel = f"weights/{name}{suffix}"
            (stage / "weights").mkdir()
            shutil.copyfile(source, stage / weights_rel)
            files.append(weights_rel)
        num_classes = args.num_classes
        if num_classes is None and not hf:
            state = read_state_dict(stage / weights_rel, name)  # tensors only, before anything is built
            try:
                num_classes = classifier_width(build(architecture, 1000), state)
            except (KeyError, ValueError, RuntimeError, TypeError) as exc:
                raise CardError(name, f"unknown architecture {architecture!r}: {exc}") from exc
        if num_classes not in (None, 1000) and not args.labels and not hf:
            raise LookupError(f"the weights have {num_classes} classes: give their names with --labels FILE "
                              "(one per line; ImageNet-1k's are used for 1000)")
        labels = LabelsSpec()
        if args.labels:
            (stage / "labels").mkdir()
            shutil.copyfile(args.labels, stage / "labels" / f"{name}.txt")
            files.append(f"labels/{name}.txt")
            labels = LabelsSpec(source="file", file=f"labels/{name}.txt")
        elif hf:
            labels = LabelsSpec(source="config")
        try:
            draft = ModelCard(name=name, architecture=architecture, description=args.description,
                              weights=WeightsSpec(path=[weights_rel]), labels=labels,
                              **({"num_classes": num_classes} if num_classes else {}))
        except ValidationError as exc:
            raise CardError(name, "; ".join(e["msg"] for e in exc.errors())) from exc
        device = resolve_device(settings.device)
        model = load_model(draft, stage, device, settings.fold_batchnorm)
        built = load_model(draft, stage, device, fold_norms=False).module
        header = (f"Added by `python -m service add-model {args.architecture}`: each value below was derived "
                  "from the model\nand its weights; edit any.")
        written = write_card(model.card, stage, header)
        read_card(written)  # what the server will read
        report = full_self_test(model, built)
        print("\n".join(describe(report)))
        if not report.passed:
            print(f"add-model {args.architecture}: not added: the self-test failed (above)", file=sys.stderr)
            return 1
        target.mkdir(parents=True, exist_ok=True)
        for rel in [*files, written.name]:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            if (stage / rel).is_dir():
                shutil.copytree(stage / rel, target / rel, dirs_exist_ok=True)
            else:
                shutil.copyfile(stage / rel, target / rel)
    print(f"added {name}: {target / written.name}")
    return 0
