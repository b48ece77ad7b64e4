"""Profile the worker's per-image stages (``cxrd.worker.prepare`` and ``write_heatmap``).

Runs the two functions in a loop over the benchmark's cached inputs (make them first with
``bench/pipeline.py --stage-only --n 16 --variants uncompressed --no-baseline``), with the
model's real outputs, and prints the per-stage means and a pyinstrument profile of the loop:

    .venv/bin/python bench/profile_stages.py                      # stage means + profile
    .venv/bin/python bench/profile_stages.py --profiler none      # stage means only
    py-spy record -o /tmp/x.json --format speedscope -- \\
        .venv/bin/python bench/profile_stages.py --profiler none --repeat 20

Install the profilers with ``.venv/bin/pip install py-spy pyinstrument``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: import cxrd
    sys.path.insert(0, str(ROOT))

DEFAULT_INPUTS = (Path(tempfile.gettempdir()) / "cxrd-bench" / "cache"
                  / "uncompressed-2500x2048-seed7")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=Path, default=DEFAULT_INPUTS,
                   help=f"folder of .dcm files (default {DEFAULT_INPUTS})")
    p.add_argument("--repeat", type=int, default=5, help="passes over the files (default 5)")
    p.add_argument("--profiler", choices=("pyinstrument", "none"), default="pyinstrument")
    p.add_argument("--compression", default="none",
                   help="[results].heatmap_compression for write_heatmap (default none)")
    p.add_argument("--max-side", type=int, default=1024,
                   help="[results].heatmap_max_side for write_heatmap (default 1024)")
    p.add_argument("--preprocessing", default=None,
                   help="run the model as if it declared this preprocessing contract "
                        "(default: the one it declares), e.g. cxrd-gray8-stretch-v1 to "
                        "compare the contracts in one tree")
    p.add_argument("--batch", type=int, default=1,
                   help="prepare this many images, run the model on them, then write their "
                        "SCs, as the worker does (default 1: prepare and write in turn, "
                        "no model run in the loop)")
    args = p.parse_args(argv)

    from cxrd.infer import Classifier
    from cxrd.worker import prepare, write_heatmap

    files = sorted(args.inputs.glob("*.dcm"))
    if not files:
        print(f"no .dcm files under {args.inputs}; run bench/pipeline.py first", file=sys.stderr)
        return 2
    clf = Classifier(None, ["CPUExecutionProvider"])
    model = clf.info
    if args.preprocessing:
        model = dataclasses.replace(model, preprocessing=args.preprocessing)
    outputs = []
    for f in files:
        prep = prepare(f, model)
        probs, cams = clf.run(prep.model_input[None])
        outputs.append((probs[0], cams[0]))
    out = Path(tempfile.mkdtemp(prefix="cxrd-profile-"))
    kwargs: dict[str, Any] = {"max_side": args.max_side, "compression": args.compression}
    accepted = inspect.signature(write_heatmap).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}  # older write_heatmap

    def loop() -> dict[str, list[float]]:
        stages: dict[str, list[float]] = {}
        pairs = list(zip(files, outputs, strict=True))
        for _ in range(args.repeat):
            for start in range(0, len(pairs), args.batch):
                batch = pairs[start:start + args.batch]
                preps = [prepare(f, model) for f, _ in batch]
                if args.batch > 1:
                    clf.run(np.stack([p.model_input for p in preps]))
                for prep, (_, (probs, cam)) in zip(preps, batch, strict=True):
                    write_heatmap(prep, probs, cam, model, out, 1, **kwargs)
                    for k, v in prep.timings.items():
                        stages.setdefault(k, []).append(v)
        return stages

    try:
        repeat, args.repeat = args.repeat, 1
        loop()  # warm-up, untimed
        args.repeat = repeat
        t0 = time.perf_counter()
        if args.profiler == "pyinstrument":
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
            profiler.start()
            stages = loop()
            profiler.stop()
        else:
            stages = loop()
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    n = len(files) * args.repeat
    print(f"{n} images ({len(files)} files x {args.repeat}) in {wall:.2f} s")
    for k, v in stages.items():
        print(f"  {k:<12} mean {1000 * float(np.mean(v)):6.1f} ms   "
              f"p50 {1000 * float(np.median(v)):6.1f} ms")
    if args.profiler == "pyinstrument":
        print(profiler.output_text(unicode=False, color=False, show_all=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
