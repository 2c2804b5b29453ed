"""Peak memory of the loader's decode on a decompression bomb: a single-colour 12000x12000 PNG (a few hundred kB).

    python -m benchmarks.huge_image

Two rows, each in a fresh process: the image decoded as a small JPEG is (no pixel limit, PIL's limit lifted), and
as vlp's transform takes it (refused by its header's size, `image_too_large`). Prints the peak RSS each added.
"""
from __future__ import annotations

import json
import subprocess
import sys

_ROW = r"""
import io, json, random, resource, sys, warnings
warnings.simplefilter("ignore")
import torch
from PIL import Image
from open_clip.transform import image_transform
from vlp.data.errors import SkipSample
from vlp.data.transforms import build_transform
torch.set_num_threads(1)
buf = io.BytesIO()
Image.new("RGB", (12000, 12000), (40, 90, 200)).save(buf, format="PNG")
data = buf.getvalue()
small = io.BytesIO()
Image.new("RGB", (64, 48), (1, 2, 3)).save(small, format="JPEG")
t = build_transform(image_transform(224, is_train=True), rrc_scale=(0.9, 1.0), strong=False)
t(small.getvalue(), random.Random(0))
if sys.argv[1] == "unlimited":
    Image.MAX_IMAGE_PIXELS = None
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    t(data, random.Random(0))
    res = "decoded"
except SkipSample as e:
    res = e.reason
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"png_kB": len(data) / 1e3, "result": res, "base_MB": base / 1024, "peak_MB": peak / 1024}))
"""


def main() -> None:
    for mode in ("unlimited", "vlp"):
        out = subprocess.run([sys.executable, "-c", _ROW, mode], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:10s} {r['png_kB']:.0f} kB PNG: {r['result']:16s} peak RSS {r['base_MB']:.0f} -> "
              f"{r['peak_MB']:.0f} MB (+{r['peak_MB'] - r['base_MB']:.0f} MB)")


if __name__ == "__main__":
    main()
