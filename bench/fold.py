"""The engine's methods on the model with its BatchNorms folded into their convolutions (as the zoo loads it,
service/zoo/fold.py) against the same model as built, same process, alternating, on chelsea.

    .venv/bin/python bench/fold.py [--device cpu] [--model efficientnet_lite0] [--threads N]

Prints ms per image for each, their ratio, and the largest difference between the two maps.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.variants import CASES, compare  # noqa: E402
from service.host import retain_freed_memory  # noqa: E402
from service.zoo import load_model, read_card  # noqa: E402

# The plain gradient at batch 8 is the raw forward+backward the other methods are made of.
FOLD_CASES = [*CASES, ("gradient", {}, 8, 3)]


def main() -> None:
    from PIL import Image
    from skimage import data

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()  # as the server does
    card, device = read_card(ROOT / "models" / f"{args.model}.toml"), torch.device(args.device)
    folded = load_model(card, ROOT / "models", device)
    as_built = load_model(card, ROOT / "models", device, fold_norms=False)
    x = folded.preprocess(Image.fromarray(data.chelsea())).unsqueeze(0).to(device)
    print(f"{args.model} on {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "two alternating rounds per variant, medians\n")
    compare(("as built", as_built), ("folded", folded), x, FOLD_CASES)


if __name__ == "__main__":
    main()
