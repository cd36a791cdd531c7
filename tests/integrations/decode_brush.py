"""Decode Label Studio brush RLEs with label-studio-sdk (run in .venv/tools): JSON on stdin, .npy out.

stdin: {"rle": [...], "height": H, "width": W, "out": "path.npy"}; writes the RGBA planes, HxWx4 uint8.
"""
import json
import sys

import numpy as np
from label_studio_sdk.converter import brush

job = json.load(sys.stdin)
pixels = np.asarray(brush.decode_rle(job["rle"]), dtype=np.uint8)
np.save(job["out"], pixels.reshape(job["height"], job["width"], 4))
