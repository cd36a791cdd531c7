"""The engine's methods with the model in NHWC (channels_last, as the zoo loads it) against the same model in
NCHW (contiguous), same process, alternating, on chelsea.

    .venv/bin/python bench/memory_format.py [--device cpu] [--model efficientnet_lite0]

Prints ms per image for each layout, their ratio, and the largest difference between the two maps (the
layouts sum in different orders, so maps agree to float rounding, not bitwise).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.variants import compare  # noqa: E402
from service.host import retain_freed_memory  # noqa: E402
from service.zoo import ModelRegistry  # noqa: E402


def main() -> None:
    from PIL import Image
    from skimage import data

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="efficientnet_lite0")
    args = parser.parse_args()
    retain_freed_memory()  # as the server does
    registry = ModelRegistry.from_dir(ROOT / "models", torch.device(args.device), only={args.model})
    nhwc = registry.models[args.model]
    nchw = dataclasses.replace(nhwc,
                               module=copy.deepcopy(nhwc.module).to(memory_format=torch.contiguous_format))
    x = nhwc.preprocess(Image.fromarray(data.chelsea())).unsqueeze(0).to(args.device)
    print(f"{args.model} on {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "two alternating rounds per layout, medians\n")
    compare(("NCHW", nchw), ("NHWC", nhwc), x)


if __name__ == "__main__":
    main()
