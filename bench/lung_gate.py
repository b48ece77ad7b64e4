"""The lung-field segmenter in the worker: the gate's lung-area fractions on phantoms, the
segmenter's CPU cost per image, and its Dice under each preprocessing contract.

    python bench/lung_gate.py fractions [--n 40] [--size 610x500]
    python bench/lung_gate.py costs [--n 8] [--size 2500x2048] [--batch 4]
    python bench/lung_gate.py dice [--n 12] [--size 2500x2048]

``fractions``: chest phantoms (``make_phantom``) and hand and knee ones (``make_non_chest``),
every one with a CHEST PA header as a mislabelled image would have, through the worker's
own ``prepare`` and segmenter step; prints the distribution of the share of the image the
lung fields cover (the ``[model] min_lung_fraction`` gate compares it). ``costs``: CPU
time (``time.thread_time``, one thread for onnxruntime) per image of the segmenter's
preprocessing under v1 and v2, its input as the worker takes it (``segmenter_input``:
the classifier's own when the sizes and contracts agree), its inference (a batch's share;
image by image as the worker runs it on the CPU, and the whole batch in one run),
``lung_masks``, the SEG build (highdicom), the SEG encode (``LungSegEncoder.encode``, from
a template per kind of source) and the SEG write (``cxrd.durable.write_file`` of its
bytes). ``dice``: Dice per lung against the phantoms' own masks with the segmenter's
input made under cxrd-gray8-stretch-v1 and under v2 (at 2500 x 2048, v2
box-averages by 2 first).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cxrd.infer import Classifier, Segmenter, batch_buckets  # noqa: E402
from cxrd.lungs import lung_masks, probs_to_masks  # noqa: E402
from cxrd.preprocess import STRETCH_V1, STRETCH_V2, gray8_to_model_input  # noqa: E402
from cxrd.seg import LungSegEncoder  # noqa: E402
from cxrd.worker import (  # noqa: E402
    Prepared,
    lung_fields,
    prepare,
    segmenter_input,
    write_seg,
)
from training.masks import dice  # noqa: E402
from training.phantoms import (  # noqa: E402
    Phantom,
    make_non_chest,
    make_phantom,
    random_patient_study,
    write_dicom,
)


def _size(text: str) -> tuple[int, int]:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def _phantoms(n: int, rows: int, cols: int, seed: int, chest: bool) -> list[Phantom]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if chest:
            out.append(make_phantom(rng, ("TB", "NTB", "NORM")[i % 3], rows, cols, masks=True))
        else:  # a hand or knee sent with a chest header
            out.append(replace(make_non_chest(rng, rows, cols, masks=True),
                               body_part="CHEST", view="PA"))
    return out


def _write(phantoms: list[Phantom], folder: Path, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i, ph in enumerate(phantoms):
        path = folder / f"{i:04d}.dcm"
        write_dicom(ph, path, random_patient_study(rng))
        paths.append(path)
    return paths


def _stats(values: list[float]) -> str:
    a = np.asarray(values)
    return (f"n {a.size}  min {a.min():.4f}  p5 {np.percentile(a, 5):.4f}  median "
            f"{np.median(a):.4f}  p95 {np.percentile(a, 95):.4f}  max {a.max():.4f}")


def fractions(args: argparse.Namespace, folder: Path) -> None:
    clf = Classifier(None, ["CPUExecutionProvider"], 1)
    seg = Segmenter(None, ["CPUExecutionProvider"], 1, max_batch=4)
    rows, cols = args.size
    for chest in (True, False):
        paths = _write(_phantoms(args.n, rows, cols, args.seed + chest, chest),
                       folder / str(chest), args.seed)
        found = []
        for path in paths:
            p = prepare(path, clf.info)
            x = gray8_to_model_input(p.display, seg.input_size, seg.info.preprocessing,
                                     p.reduced)
            found.append(float(lung_fields(seg.run(x[None])[0], seg.info).mean()))
        print(f"{'chest' if chest else 'hand/knee as CHEST PA':<22} {rows}x{cols}: "
              f"{_stats(found)}")


def costs(args: argparse.Namespace, folder: Path) -> None:
    clf = Classifier(None, ["CPUExecutionProvider"], 1)
    seg = Segmenter(None, ["CPUExecutionProvider"], 1, max_batch=args.batch)
    seg.warm_up()
    whole = Segmenter(None, ["CPUExecutionProvider"], 1, max_batch=args.batch)
    whole.image_by_image, whole.buckets = False, batch_buckets(args.batch)  # the A arm
    whole.warm_up()
    rows, cols = args.size
    paths = _write(_phantoms(args.n, rows, cols, args.seed, True), folder, args.seed)
    preps: list[Prepared] = [prepare(p, clf.info) for p in paths]
    encoder = LungSegEncoder(seg.info)
    write_seg(preps[0], seg.run(gray8_to_model_input(
        preps[0].display, seg.input_size, STRETCH_V1)[None])[0], encoder, folder / "warm", 1)
    ms: dict[str, list[float]] = {k: [] for k in (
        "preprocess v1", "preprocess v2", "input in the worker", "inference",
        "inference, whole batch", "lung_masks", "SEG build", "SEG encode (template)", "SEG write")}
    from cxrd.durable import write_file
    from cxrd.seg import build_lung_seg
    from cxrd.worker import seg_uids

    for start in range(0, len(preps), args.batch):
        batch = preps[start:start + args.batch]
        inputs = []
        for p in batch:
            for name in (STRETCH_V1, STRETCH_V2):
                t = time.thread_time()
                x = gray8_to_model_input(p.display, seg.input_size, name, p.reduced)
                ms[f"preprocess {name[-2:]}"].append(time.thread_time() - t)
            t = time.thread_time()
            x = segmenter_input(p, clf.info, seg.info)
            ms["input in the worker"].append(time.thread_time() - t)
            inputs.append(x)
        t = time.thread_time()
        whole.run(np.stack(inputs))
        ms["inference, whole batch"] += [(time.thread_time() - t) / len(batch)] * len(batch)
        t = time.thread_time()
        out = seg.run(np.stack(inputs))
        ms["inference"] += [(time.thread_time() - t) / len(batch)] * len(batch)
        for p, o in zip(batch, out, strict=True):
            t = time.thread_time()
            masks = lung_masks(o, int(p.dataset.Rows), int(p.dataset.Columns))
            t1 = time.thread_time()
            series, sop = seg_uids(str(p.dataset.SOPInstanceUID),
                                   str(p.dataset.StudyInstanceUID), 1, seg.info)
            build_lung_seg(p.dataset, masks, seg.info, series_instance_uid=series,
                           sop_instance_uid=sop, instance_number=1)
            t2 = time.thread_time()
            encoded = encoder.encode(p.dataset, masks, series_instance_uid=series,
                                     sop_instance_uid=sop, instance_number=1)
            t2b = time.thread_time()
            write_file(folder / "out" / f"{sop}.dcm", encoded)
            t3 = time.thread_time()
            ms["SEG encode (template)"].append(t2b - t2)
            ms["lung_masks"].append(t1 - t)
            ms["SEG build"].append(t2 - t1)
            ms["SEG write"].append(t3 - t2b)
    print(f"CPU ms per image ({rows}x{cols}, decoded {preps[0].display.shape}, batch "
          f"{args.batch}, 1 onnxruntime thread, n {len(preps)}):")
    for k, v in ms.items():
        print(f"  {k:<24} mean {1000 * np.mean(v):7.2f}  median {1000 * np.median(v):7.2f}")


def dice_by_contract(args: argparse.Namespace, folder: Path) -> None:
    clf = Classifier(None, ["CPUExecutionProvider"], 1)
    seg = Segmenter(None, ["CPUExecutionProvider"], 1)
    rows, cols = args.size
    phantoms = _phantoms(args.n, rows, cols, args.seed, True)
    paths = _write(phantoms, folder, args.seed)
    scores: dict[str, list[float]] = {}
    for ph, path in zip(phantoms, paths, strict=True):
        p = prepare(path, clf.info)
        assert ph.lungs is not None
        for name in (STRETCH_V1, STRETCH_V2):
            x = gray8_to_model_input(p.display, seg.input_size, name, p.reduced)
            pred = probs_to_masks(seg.run(x[None])[0], rows, cols)
            for side, pm, tm in zip(("left", "right"), pred, ph.lungs, strict=True):
                scores.setdefault(f"{name} {side}", []).append(dice(pm, tm))
    for k, v in scores.items():
        print(f"  {k:<30} mean Dice {np.mean(v):.4f}  min {np.min(v):.4f}  n {len(v)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("fractions", "costs", "dice"))
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--size", type=_size, default=(610, 500))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=8080)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        {"fractions": fractions, "costs": costs, "dice": dice_by_contract}[args.what](
            args, Path(tmp))


if __name__ == "__main__":
    main()
