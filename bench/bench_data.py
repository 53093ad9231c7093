"""Input-pipeline throughput and memory on one core.

    .venv/bin/python bench/bench_data.py                      # mnist train, prepared in the data dir
    .venv/bin/python bench/bench_data.py --random_flip --batch_size 256
    .venv/bin/python bench/bench_data.py --synthetic          # random 60k x 28x28x1 in a temp dir
    .venv/bin/python bench/bench_data.py --tfds_records 2000  # also time tfds' data source (PNG decode)
    .venv/bin/python bench/bench_data.py --loader grain [--num_workers 2]  # records read through grain
    .venv/bin/python bench/bench_data.py --loader grain --source records  # tfds' array_record files, PNGs decoded

Prints the median images/s over --repeats timed runs of --batches batches,
the peak RSS of the process (and of each child process: grain's workers), and the RSS growth from loading and iterating
relative to the decoded dataset's size (uint8 images + int32 labels).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def descendants_peak_rss_mb() -> list[float]:
    """VmHWM (peak resident set) of each live descendant process, e.g. grain's workers."""
    parent, hwm = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        parent[int(pid)] = int(status.get("PPid", "0").strip())
        if "VmHWM" in status:
            hwm[int(pid)] = int(status["VmHWM"].split()[0]) / 1024
    found, frontier = [], [os.getpid()]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier]
        found += children
        frontier = children
    return [hwm[p] for p in found if p in hwm]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--split", default="train")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--batches", type=int, default=400, help="batches per timed run")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--random_flip", action="store_true")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--synthetic", action="store_true", help="random uint8 data of MNIST's size in a temp dir")
    p.add_argument("--synthetic_n", type=int, default=60000, help="examples of --synthetic (28x28x1 each)")
    p.add_argument("--tfds_records", type=int, default=0, help="also time reading N records via tfds.data_source")
    p.add_argument("--all_cores", action="store_true", help="do not pin the process to one core")
    p.add_argument("--loader", default="numpy", choices=("numpy", "grain"))
    p.add_argument("--num_workers", type=int, default=0,
                   help="grain worker processes (each one's peak RSS is printed apart)")
    p.add_argument("--source", default="decoded", choices=("decoded", "records"),
                   help="grain: the decoded cache, or tfds' array_record files (PNGs decoded per batch)")
    args = p.parse_args()

    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    import diffusion_jax
    from diffusion_jax import data

    print(f"diffusion_jax from {os.path.dirname(diffusion_jax.__file__)}")

    tmp = None
    if args.synthetic:
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
        args.data_dir, args.dataset = tmp.name, "random_uint8"
        rng = np.random.default_rng(0)
        n = args.synthetic_n
        data.write_arrays("random_uint8", {"train": (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
                                                  rng.integers(0, 10, n))}, num_classes=10,
                          data_dir=args.data_dir)

    if args.loader == "grain":  # count the pipeline, not the import of grain (and jax)
        import grain  # noqa: F401
    base = rss_mb()
    t0 = time.perf_counter()
    it = data.make_iterator(args.dataset, args.split, batch_size=args.batch_size, seed=0,
                            random_flip=args.random_flip, process_index=0, process_count=1,
                            data_dir=args.data_dir, auto_prepare=False, loader=args.loader,
                            num_workers=args.num_workers, source=args.source)
    load_s = time.perf_counter() - t0
    info = data.info(args.dataset, data_dir=args.data_dir)
    num_examples = info.splits[args.split]
    decoded_mb = num_examples * (int(np.prod(info.image_shape)) + 4) / 2**20
    next(it)  # warm-up

    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
        rates.append(args.batches * args.batch_size / (time.perf_counter() - t0))
    grown = rss_mb() - base

    print(f"dataset={args.dataset}/{args.split} N={num_examples} batch_size={args.batch_size} "
          f"random_flip={args.random_flip} cores={len(os.sched_getaffinity(0))} loader={args.loader} "
          f"num_workers={args.num_workers} source={args.source}")
    print(f"load (numpy: read + sha256 verify; grain: open the files): {load_s:.2f} s")
    print(f"images/s: median {statistics.median(rates):,.0f}  (min {min(rates):,.0f}, max {max(rates):,.0f}, "
          f"{args.repeats} runs x {args.batches} batches)")
    print(f"decoded dataset: {decoded_mb:.1f} MiB; RSS growth after load+iterate: {grown:.1f} MiB "
          f"({grown / decoded_mb:.2f}x decoded); peak RSS of process: {peak_rss_mb():.1f} MiB")
    if args.num_workers:
        print(f"peak RSS of the child processes: {', '.join(f'{r:.1f}' for r in descendants_peak_rss_mb())} MiB")
    print(f"tensorflow imported: {'tensorflow' in sys.modules}; jax imported: {'jax' in sys.modules}")
    assert batch["image"].dtype == np.float32

    if args.tfds_records:
        import tensorflow_datasets as tfds

        source = tfds.data_source(args.dataset, split=args.split, data_dir=str(data.resolve_data_dir(args.data_dir)))
        idx = np.random.default_rng(0).permutation(len(source))[: args.tfds_records].tolist()
        t0 = time.perf_counter()
        source.__getitems__(idx)
        print(f"tfds.data_source random access (PNG decode): {args.tfds_records / (time.perf_counter() - t0):,.0f} images/s")
    if hasattr(it, "close"):
        it.close()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
