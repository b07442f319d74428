"""``features.precision: auto``: bf16's speed and what it changes, on real data, in one run.

    python benchmarks/precision_auto.py [--photos 512] [--fashion 600] [--device cpu|cuda]

For each dataset, the probe ``auto`` runs (``transferlab.features.probe_bf16``) on a stratified
sample: Lite0 features at fp32 and under bf16 autocast, timed on the same images in the same
process (speed-up = fp32 time / bf16 time); then an SVM and a top layer (softmax linear head)
trained on each precision's features of every second image per class, and the share of the
other images on which the bf16-trained model predicts what the fp32-trained one predicts.
``auto`` picks bf16 where the device is bf16-native (``transferlab.precision.bf16_native``),
the speed-up is >= 1.15 and both agreements are >= 99.5%; the benchmark runs the probe even on
a device that is not native, to show what ``auto`` would see there.

Datasets: the photos (Debian's tuxpaint-stamps-default, the default preset's five classes) and
Fashion-MNIST (Debian's dataset-fashion-mnist, the t10k file, ten classes).
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transferlab.backbones import load_backbone
from transferlab.features import load_images, probe_bf16
from transferlab.precision import bf16_native, probe_sample

FASHION = Path("/usr/share/datasets/fashion-mnist")


def photos(limit: int) -> tuple[list[Path], list[str]]:
    from transferlab.config import TuxpaintSource
    from transferlab.data.sources import list_source

    files, _ = list_source(TuxpaintSource())
    labels = [f.label for f in files]
    chosen = probe_sample(labels, limit=limit)
    return [files[i].path for i in chosen], [labels[i] for i in chosen]


def fashion(limit: int, folder: Path) -> tuple[list[Path], list[str]]:
    with gzip.open(FASHION / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / "t10k-labels-idx1-ubyte.gz") as f:
        labels = [str(v) for v in np.frombuffer(f.read(), np.uint8, offset=8)]
    paths, names = [], []
    for i in probe_sample(labels, limit=limit):
        path = folder / f"{i}.png"
        Image.fromarray(images[i]).save(path)
        paths.append(path)
        names.append(labels[i])
    return paths, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=512, help="photos to probe on")
    parser.add_argument("--fashion", type=int, default=600, help="Fashion-MNIST images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    device = torch.device(args.device)
    backbone = load_backbone("efficientnet_lite0", "package").to(device)
    print(f"device {device}: bf16-native = {bf16_native(device)}; torch {torch.__version__}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        datasets = {
            "photos": lambda: photos(args.photos),
            "fashion_mnist": lambda: fashion(args.fashion, Path(tmp)),
        }
        for name, get in datasets.items():
            paths, labels = get()
            x = load_images(paths, backbone.spec).to(device)
            verdict = probe_bf16(backbone, x, labels, batch_size=args.batch_size)
            results[name] = {"images": len(paths), "classes": len(set(labels)), **verdict}
            print(
                f"{name}: {len(paths)} images, bf16 {verdict['speedup']:.2f}x fp32; "
                f"predictions agree svm {verdict['svm']:.2%} top {verdict['top']:.2%} "
                f"on {verdict['n_test']}; cosine mean {verdict['mean_cos']:.5f} "
                f"min {verdict['min_cos']:.5f} -> auto would pick "
                f"{verdict['choice'] if bf16_native(device) else 'fp32 (not native)'}"
            )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
