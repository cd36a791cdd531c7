"""`saliency`: explain images from a shell, list models and methods, read a model's sanity report.

    saliency explain cat.jpg --method gradcam --out cat_gradcam.png --npy cat_gradcam.npy --metrics
    saliency explain photo.jpg --method drise --model mtcnn -p n_masks=500   # photo_drise_0.png, ... per box
    saliency sanity efficientnet_lite0
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .client import Client
from .errors import SaliencyError
from .results import Detection, DetectionExplanation


def _param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers and booleans keep their type
    except json.JSONDecodeError:
        return key, value


def _target_path(template: str | None, image: str, many: bool) -> Path | None:
    if template is None:
        return None
    if many and "{stem}" not in template:
        raise SystemExit("with several images, --out/--npy/--gray need a {stem} placeholder, "
                         "e.g. {stem}_cam.png")
    return Path(template.format(stem=Path(image).stem))


def _detection_path(template: str, image: str, many: bool, index: int) -> Path:
    """A detection's file: `{index}` in the template, else `_<index>` before its suffix (one file per box)."""
    if "{index}" not in template:
        stem, dot, suffix = template.rpartition(".")
        template = f"{stem}_{{index}}.{suffix}" if dot and "/" not in suffix else f"{template}_{{index}}"
    if many and "{stem}" not in template:
        raise SystemExit("with several images, --out/--npy/--gray need a {stem} placeholder, "
                         "e.g. {stem}_drise.png")
    return Path(template.format(stem=Path(image).stem, index=index))


def gray(d: Detection) -> Image.Image:
    """The map as an 8-bit grayscale PNG: the service's own when asked (--gray), else rounded from the float
    map as the service rounds it."""
    if d.png is not None:
        return d.png
    assert d.map is not None  # every call asks for npy
    return Image.fromarray(np.round(np.clip(d.map, 0, 1) * 255).astype(np.uint8))


def report_detections(result: DetectionExplanation, args) -> None:
    """A detector's answer: per detection its box, label and score, and its map written to files; with no
    --out/--gray/--npy, the map as an 8-bit grayscale PNG, {stem}_{method}_{index}.png (made here from the
    float map, which every answer holds, so the request is the same as a classifier's)."""
    templates = {"out": args.out, "gray": args.gray, "npy": args.npy}
    if not any(templates.values()):
        templates["gray"] = "{stem}_" + result.method + "_{index}.png"
    many = len(args.images) > 1
    for image, found in zip(args.images, result, strict=False):
        if not args.json and not args.quiet:
            print(f"{image}: {len(found)} detection{'s' if len(found) != 1 else ''} by {result.model} "
                  f"({result.method}), {found.width}x{found.height}")
        for index, d in enumerate(found):
            written = []
            for key, save in (("out", lambda p, d=d: d.overlay.save(p)),
                              ("gray", lambda p, d=d: gray(d).save(p)),
                              ("npy", lambda p, d=d: np.save(p, d.map))):
                template = templates[key]
                if template:
                    path = _detection_path(template, image, many, index)
                    save(path)
                    written.append(str(path))
            box = [round(v, 1) for v in d.box]
            if args.json:
                print(json.dumps({"image": image, "model": result.model, "method": result.method,
                                  "index": index, "box": list(d.box), "label": d.label,
                                  "label_index": d.label_index, "score": d.score, "written": written,
                                  "diagnostics": d.diagnostics}))
            elif not args.quiet:
                print(f"  [{index}] {d.label} score={d.score:.3f} box={box}"
                      + (f" -> {', '.join(written)}" if written else ""))


def cmd_explain(client: Client, args) -> int:
    outputs = ["npy"]
    if args.out:
        outputs.append("overlay")
    if args.gray:
        outputs.append("png")
    metrics = None
    if args.metrics:
        outputs.append("metrics")
        metrics = {"steps": args.metrics_steps, "replacement": args.metrics_replacement}
    params = dict(args.param or [])
    many = len(args.images) > 1
    if args.job:
        job = client.submit(args.images, args.method, model=args.model, targets=args.target, outputs=outputs,
                            params=params, metrics=metrics)
        result = client.wait(job.id, progress=not args.quiet)
    else:
        result = client.explain(args.images, args.method, model=args.model, targets=args.target,
                                outputs=outputs, params=params, metrics=metrics)
    if isinstance(result, DetectionExplanation):
        report_detections(result, args)
        return 0
    for image, r in zip(args.images, result, strict=False):
        written = []
        # each saver is called in this iteration; `r=r` binds it anyway (ruff B023)
        for template, save in ((args.out, lambda p, r=r: r.overlay.save(p)),
                               (args.gray, lambda p, r=r: r.png.save(p)),
                               (args.npy, lambda p, r=r: np.save(p, r.map))):
            path = _target_path(template, image, many)
            if path is not None:
                save(path)
                written.append(str(path))
        if args.json:
            line = {"image": image, "model": result.model, "method": result.method, "target": r.target,
                    "label": r.label, "probability": r.probability, "written": written,
                    "diagnostics": r.diagnostics}
            if r.metrics is not None:
                line["metrics"] = r.metrics
            print(json.dumps(line))
        elif not args.quiet:
            print(f"{image}: {r.label} (class {r.target}, p={r.probability:.3f}) {result.method} "
                  f"on {result.model}" + (f" -> {', '.join(written)}" if written else ""))
            if r.metrics is not None:
                print("  " + metrics_in_words(r.metrics))
    return 0


def metrics_in_words(m: dict) -> str:
    """A map's per-map metrics as one line a reader can judge: each AUC beside its random-order baseline."""
    words = (f"deletion AUC {m['deletion_auc']:.3f} (random order {m['deletion_auc_random']:.3f}; lower is "
             f"more faithful), insertion AUC {m['insertion_auc']:.3f} (random order "
             f"{m['insertion_auc_random']:.3f}; higher is more faithful), {m['steps']} steps, "
             f"{m['replacement']}")
    if m.get("stability") is not None:
        words += f", stability {m['stability']:.2f} (rank correlation of two independent halves)"
    return words


def cmd_sanity(client: Client, args) -> int:
    if args.cached:
        report = client.sanity_report(args.model)
        if report is None:
            print(f"saliency: no sanity report of {args.model} yet (run without --cached to make one)",
                  file=sys.stderr)
            return 1
    else:
        methods = args.methods.split(",") if args.methods else None
        report = client.sanity(args.model, methods=methods, seed=args.seed, profile=args.profile,
                               refresh=args.refresh, progress=not args.quiet)
    if args.json:
        print(report.model_dump_json(indent=2))
        return 0
    print(f"sanity report of {report.model}: {report.images} photos, profile {report.profile}, seed "
          f"{report.seed}, {report.elapsed_s:.0f} s on {report.device}")
    print(f"{'method':<22} {'verdict':<8} {'all layers random':>17} {'other class':>11}  reason")
    for name, r in report.methods.items():
        final = r.levels[-1].spearman if r.levels else float("nan")
        other = r.random_target.get("spearman")
        shown = f"{other:.2f}" if other is not None else "-"
        print(f"{name:<22} {r.verdict:<8} {final:>17.2f} {shown:>11}  {r.reason}")
    for name, reason in report.skipped.items():
        print(f"{name:<22} {'n/a':<8} {'':>17} {'':>11}  {reason}")
    return 0 if all(r.verdict == "pass" for r in report.methods.values()) or not args.strict else 2


def cmd_models(client: Client, args) -> int:
    models = client.models()
    if args.json:
        print(json.dumps([m.model_dump() for m in models], indent=2))
        return 0
    for m in models:
        state = (f"{m.device}, input {m.input_size}, {m.num_classes} classes" if m.available
                 else f"unavailable: {m.reason}")
        print(f"{'*' if m.default else ' '} {m.name:<20} {m.architecture:<32} {state}")
    return 0


_DEFAULT_SAID = re.compile(r"\(default:?\s*([^)]*)\)")


def shown_default(schema: dict) -> str:
    """A parameter's default as the server applies it. A null default means the server chooses (the
    `precision` of its own setting, a model card's Grad-CAM layer): the parameter's description says which,
    in its "(default: ...)", shown here as <...>."""
    default = schema.get("default")
    if default is not None:
        return repr(default)
    said = _DEFAULT_SAID.search(schema.get("description", ""))
    return f"<{said.group(1).strip()}>" if said else "<the server's choice>"


def cmd_methods(client: Client, args) -> int:
    methods = client.methods()
    if args.json:
        print(json.dumps([m.model_dump() for m in methods], indent=2))
        return 0
    for m in methods:
        params = ", ".join(f"{k}={shown_default(v)}" for k, v in m.parameters.get("properties", {}).items())
        print(f"{m.name:<22} {m.cost:<30} {params}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saliency", description="Client of the saliency HTTP service.")
    p.add_argument("--url", default=os.environ.get("SALIENCY_URL", "http://127.0.0.1:8000"),
                   help="service address (env SALIENCY_URL)")
    p.add_argument("--api-key", default=os.environ.get("SALIENCY_API_KEY"), help="env SALIENCY_API_KEY")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--retries", type=int, default=3,
                   help="retries when the queue is full (honours Retry-After)")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("explain", help="explain images; print the class, write the maps")
    e.add_argument("images", nargs="+", help="image files")
    e.add_argument("--method", "-m", default="gradcam")
    e.add_argument("--model")
    e.add_argument("--target", type=int, help="class index (default: each image's top-1 class); of a "
                                              "detector, the index of the detection to explain")
    e.add_argument("--out", "-o", help="overlay PNG to write ({stem} = the image's name; of a detector, one "
                                       "per detection: {index}, else _0, _1, ... before the suffix)")
    e.add_argument("--gray", help="grayscale PNG of the map to write")
    e.add_argument("--npy", help="float32 map (.npy) to write")
    e.add_argument("-p", "--param", action="append", type=_param, metavar="NAME=VALUE",
                   help="method parameter, repeatable: -p n_steps=32")
    e.add_argument("--metrics", action="store_true",
                   help="also the per-map faithfulness metrics (deletion/insertion AUC against a random "
                        "order; 4 (K - 1) + 1 forward passes more per image)")
    e.add_argument("--metrics-steps", type=int, default=20, metavar="K", help="steps of the curves (2-100)")
    e.add_argument("--metrics-replacement", default="blur", choices=("blur", "black", "mean"),
                   help="what a removed pixel becomes")
    e.add_argument("--job", action="store_true", help="run as a job with a progress bar (long methods)")
    e.add_argument("--json", action="store_true", help="one JSON line per image")
    e.add_argument("--quiet", "-q", action="store_true")
    e.set_defaults(run=cmd_explain)
    s = sub.add_parser("sanity", help="a model's sanity report: does each method's map depend on the model "
                                      "and the class? (docs/sanity.md)")
    s.add_argument("model")
    s.add_argument("--methods", help="comma-separated methods (default: every method)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--profile", default="quick", choices=("quick", "full"),
                   help="quick: the iterative methods at cheap parameters (minutes on a CPU); full: defaults")
    s.add_argument("--refresh", action="store_true", help="compute again even if a report is kept")
    s.add_argument("--cached", action="store_true", help="only read the newest report; start nothing")
    s.add_argument("--strict", action="store_true", help="exit 2 when a method fails")
    s.add_argument("--json", action="store_true", help="the whole report as JSON")
    s.add_argument("--quiet", "-q", action="store_true")
    s.set_defaults(run=cmd_sanity)
    for name, run, text in (("models", cmd_models, "list the models"),
                            ("methods", cmd_methods, "list the methods")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--json", action="store_true")
        s.set_defaults(run=run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with Client(args.url, args.api_key, timeout=args.timeout, max_retries=args.retries) as client:
            return args.run(client, args)
    except SaliencyError as exc:
        print(f"saliency: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"saliency: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
