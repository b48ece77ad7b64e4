"""Command line: ``python -m training {index,phantoms,train,export,evaluate,demo,
demo-localisation}`` and,
for the lung-field segmenter, ``{train-seg,export-seg,evaluate-seg,demo-seg}``.

The usual sequence on the public data sets::

    python -m training index --source tbx11k=/data/TBX11K --source kermany=/data/chest_xray \
        --source nih_tb=/data/nih-tb --source shenzhen=/data/ChinaSet_AllFiles \
        --source montgomery=/data/MontgomerySet --out runs/manifest.csv
    python -m training train --manifest runs/manifest.csv --run runs/r1 --weights PATH
    python -m training export --run runs/r1 --manifest runs/manifest.csv --out runs/r1/model.onnx
    python -m training evaluate --model runs/r1/model.onnx --manifest runs/manifest.csv \
        --out runs/r1/eval --write-metadata

``python -m training demo`` regenerates the shipped demo model from synthetic phantoms,
``python -m training demo-seg`` the demo lung-field segmenter, and
``python -m training demo-localisation`` scores the two together on the demo's held-out
phantoms.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from training.sources import DEFAULT_TEST_SOURCES

log = logging.getLogger("training")


def _add_index(sub: Any) -> None:
    p = sub.add_parser("index", help="index public data sets into one manifest with splits")
    p.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a data set root; NAME is one of shenzhen, montgomery, tbx11k, "
        "kermany, nih_tb, phantom (repeatable)",
    )
    p.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
    p.add_argument("--label-map", type=Path, help="JSON overriding the default label map")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--nih-csv", type=Path, help="the NIH TB metadata CSV (default: found in the folder)"
    )
    p.add_argument(
        "--test-sources", default=",".join(DEFAULT_TEST_SOURCES), metavar="NAMES",
        help="comma-separated sources kept whole as the external test split (default "
        "%(default)s; '' for none, e.g. to train the segmenter on their lung masks)",
    )


def _add_phantoms(sub: Any) -> None:
    p = sub.add_parser("phantoms", help="generate synthetic chest phantoms with lesion boxes")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--n", type=int, default=300, help="number of images (or studies with --studies)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("png", "dcm"), default="png")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("ROWS", "COLS"),
        help="fixed size (default: realistic random sizes around 2500x2048)",
    )
    p.add_argument(
        "--studies",
        action="store_true",
        help="DICOM studies with several images, lateral views and non-chest images",
    )
    p.add_argument("--masks", action="store_true",
                   help="also write each image's left and right lung-field masks (PNG)")


def _add_train(sub: Any) -> None:
    from training.model import WEIGHTS_HELP

    p = sub.add_parser("train", help="train the classifier on a manifest's train/val splits")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--run", type=Path, required=True, help="run folder for checkpoints and logs")
    p.add_argument("--weights", default="none", help=WEIGHTS_HELP)
    p.add_argument("--input-size", type=int, default=224, help="224 (default) or up to 512")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hflip",
        action="store_true",
        help="add left-right flips (off by default: the chest is not symmetric)",
    )
    p.add_argument(
        "--vflip", action="store_true",
        help="add upside-down copies (off by default); a localisation aid, see TrainConfig",
    )
    p.add_argument("--max-zoom", type=float, default=0.08, help="random zoom, +- fraction")
    p.add_argument(
        "--max-shift", type=float, default=0.0,
        help="random translation, +- fraction of the side (default 0: off)",
    )
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument(
        "--cam-loss-weight", type=float, default=0.0,
        help="weight of an extra cross-entropy on the top-k pooled CAM, a localisation aid "
        "(default 0: off; the exported model is GAP -> Dense either way)",
    )
    p.add_argument("--cam-top-k", type=int, default=4, help="CAM positions pooled by that loss")
    p.add_argument(
        "--gap-loss-weight", type=float, default=1.0,
        help="weight of the classifier's own (GAP) cross-entropy in the first phase",
    )
    p.add_argument(
        "--erase-loss-weight", type=float, default=0.0,
        help="weight of the erase-consistency loss, a localisation aid (default 0: off): "
        "a square on the CAM's peak is replaced by the mirror image's and the class's "
        "probability must drop",
    )
    p.add_argument("--erase-size", type=float, default=0.25,
                   help="side of that square, as a fraction of the image side")
    p.add_argument(
        "--locality-loss-weight", type=float, default=0.0,
        help="weight of the occlusion-locality loss, a localisation aid (default 0: off): "
        "with a random square replaced by the mirror image's, the CAM of the cells away "
        "from the square must not change, so evidence stays near what it comes from",
    )
    p.add_argument("--locality-size", type=float, default=0.25,
                   help="side of that square, as a fraction of the image side")
    p.add_argument("--locality-margin", type=float, default=1.0,
                   help="CAM cells around the square left free to change")
    p.add_argument(
        "--head-epochs", type=int, default=0,
        help="then fit the Dense head alone (backbone frozen) with the GAP loss",
    )
    p.add_argument("--steps-per-epoch", type=int, help="cap steps per epoch (smoke tests)")


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export a trained run to ONNX with probs and cam")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument(
        "--manifest", type=Path, required=True, help="validation images for the parity check"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default="cxrd-mobilenetv2")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--demo", action="store_true", help="mark the model as a DEMO model")
    p.add_argument(
        "--allow-untrained",
        action="store_true",
        help="skip the check that outputs vary (for smoke tests only)",
    )


def _add_evaluate(sub: Any) -> None:
    from cxrd.findings import LUNG_MARGIN

    p = sub.add_parser("evaluate", help="evaluate an ONNX model on val and external test splits")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument(
        "--write-metadata",
        action="store_true",
        help="record the operating point and headline figures in the model file",
    )
    p.add_argument("--segmenter", type=Path,
                   help="an ONNX lung-field segmenter: adds the pointing game and the region "
                   "IoU with the evidence restricted to the lungs, as the node restricts it")
    p.add_argument("--lung-margin", type=float, default=LUNG_MARGIN,
                   help="the margin around the lungs, a fraction of the image side "
                   "([results] lung_margin; default %(default)s)")


def _add_demo_localisation(sub: Any) -> None:
    from cxrd.findings import LUNG_MARGIN
    from training.demo import PHANTOM_SIZE

    p = sub.add_parser("demo-localisation", help="localisation of the shipped DEMO model with "
                       "and without the shipped DEMO segmenter's lungs, on the demo recipe's "
                       f"held-out phantoms ({PHANTOM_SIZE[0]} x {PHANTOM_SIZE[1]})")
    p.add_argument("--work", type=Path, default=Path("runs/demo-localisation"))
    p.add_argument("--n-test", type=int, default=600,
                   help="held-out images (default %(default)s, the demo recipe's)")
    p.add_argument("--seed", type=int, default=7, help="the demo recipe's seed")
    p.add_argument("--lung-margin", type=float, default=LUNG_MARGIN,
                   help="the margin around the lungs (default %(default)s)")
    p.add_argument("--write-metadata", action="store_true",
                   help="add the figures to both shipped models' metadata")


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="regenerate the DEMO model from synthetic phantoms")
    p.add_argument("--work", type=Path, default=Path("runs/demo"))
    p.add_argument("--out", type=Path, default=Path("cxrd/models/cxrd-demo.onnx"))
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-test", type=int, default=600)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--ship-below-target", action="store_true",
                   help="ship even below the acceptance figures (they stay in the metadata)")


def _add_train_seg(sub: Any) -> None:
    from training.model import SEGMENTER_WEIGHTS_HELP

    p = sub.add_parser("train-seg", help="train the lung-field segmenter on a manifest's "
                       "train/val images that have lung masks")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--run", type=Path, required=True, help="run folder for checkpoints and logs")
    p.add_argument("--weights", default="none", help=SEGMENTER_WEIGHTS_HELP)
    p.add_argument("--input-size", type=int, default=256, help="a multiple of 32 (default 256)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-per-epoch", type=int, help="cap steps per epoch (smoke tests)")


def _add_export_seg(sub: Any) -> None:
    p = sub.add_parser("export-seg", help="export a trained segmenter run to ONNX")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--manifest", type=Path, required=True,
                   help="validation images for the parity check")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default="cxrd-lungseg")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--demo", action="store_true", help="mark the model as a DEMO model")
    p.add_argument("--allow-untrained", action="store_true",
                   help="skip the check that outputs vary (for smoke tests only)")


def _add_evaluate_seg(sub: Any) -> None:
    p = sub.add_parser("evaluate-seg", help="Dice per lung of an ONNX segmenter on the "
                       "val and test images with lung masks")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--write-metadata", action="store_true",
                   help="record the headline figures in the model file")


def _add_demo_seg(sub: Any) -> None:
    from training.demo_seg import DEMO_SEG_EPOCHS

    p = sub.add_parser("demo-seg", help="regenerate the DEMO lung-field segmenter from "
                       "synthetic phantoms")
    p.add_argument("--work", type=Path, default=Path("runs/demo-seg"))
    p.add_argument("--out", type=Path, default=Path("cxrd/models/cxrd-demo-lungseg.onnx"))
    p.add_argument("--n-train", type=int, default=600, help="training studies")
    p.add_argument("--n-test", type=int, default=150, help="held-out studies")
    p.add_argument("--epochs", type=int, default=DEMO_SEG_EPOCHS)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--ship-below-target", action="store_true",
                   help="ship even below the acceptance figures (they stay in the metadata)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_index, _add_phantoms, _add_train, _add_export, _add_evaluate, _add_demo,
                _add_demo_localisation, _add_train_seg, _add_export_seg, _add_evaluate_seg,
                _add_demo_seg):
        add(sub)
    return parser


def cmd_index(args: argparse.Namespace) -> int:
    from training import sources

    roots: dict[str, Path] = {}
    for item in args.source:
        name, _, path = item.partition("=")
        if not path or name not in sources.INDEXERS:
            raise SystemExit(
                f"--source {item!r}: expected NAME=PATH with NAME in "
                f"{', '.join(sorted(sources.INDEXERS))}"
            )
        roots[name] = Path(path)
    label_map = sources.load_label_map(args.label_map)
    records = sources.build_manifest(
        roots,
        args.out,
        label_map=label_map,
        val_fraction=args.val_fraction,
        seed=args.seed,
        nih_csv=args.nih_csv,
        progress=sys.stderr.isatty(),
        test_sources=[s for s in args.test_sources.split(",") if s],
    )
    print(json.dumps(sources.summarize(records), indent=2))
    print(f"wrote {args.out} ({len(records)} images)")
    return 0


def cmd_phantoms(args: argparse.Namespace) -> int:
    import training.phantoms as phantoms

    size = tuple(args.size) if args.size else None
    if args.studies:
        gt = phantoms.generate_studies(args.out, args.n, args.seed, size=size, masks=args.masks)
    else:
        gt = phantoms.generate_images(
            args.out, args.n, args.seed, fmt=args.format, size=size,
            progress=sys.stderr.isatty(), masks=args.masks,
        )
    print(f"wrote {len(gt)} images and {args.out / 'ground_truth.csv'}")
    return 0


def _split(records: list[Any], split: str) -> list[Any]:
    return [r for r in records if r.split == split]


def cmd_train(args: argparse.Namespace) -> int:
    from pydicom.uid import generate_uid

    from cxrd.modelinfo import PREPROCESSING
    from training import sources
    from training.data import load_images
    from training.train import TrainConfig, train

    if not 32 <= args.input_size <= 512:
        raise SystemExit("--input-size must be between 32 and 512")
    records = sources.read_manifest(args.manifest)
    cache = args.run / "cache"
    tty = sys.stderr.isatty()
    train_set = load_images(_split(records, "train"), args.input_size,
                            preprocessing=PREPROCESSING, cache_dir=cache, progress=tty,
                            desc="train")
    val_set = load_images(_split(records, "val"), args.input_size,
                          preprocessing=PREPROCESSING, cache_dir=cache, progress=tty,
                          desc="val")
    if not len(train_set) or not len(val_set):
        raise SystemExit(
            f"{args.manifest} has {len(train_set)} train and {len(val_set)} "
            "validation images; both are needed."
        )
    cfg = TrainConfig(
        input_size=args.input_size,
        weights=args.weights,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        patience=args.patience,
        seed=args.seed,
        hflip=args.hflip,
        vflip=args.vflip,
        max_zoom=args.max_zoom,
        max_shift=args.max_shift,
        label_smoothing=args.label_smoothing,
        cam_loss_weight=args.cam_loss_weight,
        cam_top_k=args.cam_top_k,
        gap_loss_weight=args.gap_loss_weight,
        erase_loss_weight=args.erase_loss_weight,
        erase_size=args.erase_size,
        locality_loss_weight=args.locality_loss_weight,
        locality_size=args.locality_size,
        locality_margin=args.locality_margin,
        head_epochs=args.head_epochs,
        steps_per_epoch=args.steps_per_epoch,
    )
    train(train_set, val_set, cfg, args.run)
    summary = sources.summarize(records)
    (args.run / "run.json").write_text(
        json.dumps(
            {
                "device_uid": generate_uid(),  # new for every training run (IHE AIR)
                "manifest": str(args.manifest.resolve()),
                "input_size": args.input_size,
                "preprocessing": PREPROCESSING,
                "weights": args.weights,
                "training_data": _training_data_summary(records),
                "summary": summary,
                "config": asdict(cfg),
            },
            indent=2,
        )
    )
    print(f"trained: {args.run / 'checkpoint.weights.h5'}")
    return 0


def cmd_train_seg(args: argparse.Namespace) -> int:
    from pydicom.uid import generate_uid

    from cxrd.modelinfo import PREPROCESSING
    from training import sources
    from training.segment import SegTrainConfig, load_mask_set, train_segmenter, with_masks

    if not 64 <= args.input_size <= 512 or args.input_size % 32:
        raise SystemExit("--input-size must be a multiple of 32 between 64 and 512")
    records = sources.read_manifest(args.manifest)
    cache = args.run / "cache"
    tty = sys.stderr.isatty()
    train_recs, val_recs = with_masks(records, "train"), with_masks(records, "val")
    if not train_recs or not val_recs:
        raise SystemExit(
            f"{args.manifest} has {len(train_recs)} train and {len(val_recs)} validation "
            "images with lung masks; both are needed.")
    train_set = load_mask_set(train_recs, args.input_size, cache_dir=cache, progress=tty,
                              desc="train")
    val_set = load_mask_set(val_recs, args.input_size, cache_dir=cache, progress=tty,
                            desc="val")
    cfg = SegTrainConfig(
        input_size=args.input_size, weights=args.weights, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate,
        patience=args.patience, seed=args.seed, steps_per_epoch=args.steps_per_epoch,
    )
    train_segmenter(train_set, val_set, cfg, args.run)
    masked = [r for r in records if r.lung_masks]
    (args.run / "run.json").write_text(json.dumps({
        "device_uid": generate_uid(),  # new for every training run (IHE AIR)
        "manifest": str(args.manifest.resolve()),
        "input_size": args.input_size,
        "preprocessing": PREPROCESSING,
        "weights": args.weights,
        "training_data": _training_data_summary(masked),
        "config": asdict(cfg),
    }, indent=2))
    print(f"trained: {args.run / 'checkpoint.weights.h5'}")
    return 0


def cmd_export_seg(args: argparse.Namespace) -> int:
    from cxrd.modelinfo import SegmentationInfo
    from cxrd.preprocess import STRETCH_V1
    from training import sources
    from training.data import load_images, to_inputs
    from training.model import build_segmenter
    from training.segment import export_segmenter, with_masks

    run = json.loads((args.run / "run.json").read_text())
    # The contract the run trained on (runs from before cxrd-gray8-stretch-v2 name none).
    preprocessing = run.get("preprocessing", STRETCH_V1)
    model = build_segmenter(run["input_size"], str(args.run / "checkpoint.weights.h5"))
    records = with_masks(sources.read_manifest(args.manifest), "val")
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(records), size=min(16, len(records)), replace=False))
    samples = to_inputs(load_images([records[i] for i in pick], run["input_size"],
                                    preprocessing=preprocessing).images)
    info = SegmentationInfo(name=args.name, version=args.version,
                            device_uid=run["device_uid"], input_size=run["input_size"],
                            preprocessing=preprocessing, training_data=run["training_data"],
                            demo=args.demo)
    checks = export_segmenter(model, args.out, info, samples,
                              min_output_spread=0.0 if args.allow_untrained else 0.9)
    print(json.dumps(checks, indent=2))
    print(f"exported {args.out} ({info.display_name})")
    return 0


def cmd_evaluate_seg(args: argparse.Namespace) -> int:
    from cxrd.modelinfo import SegmentationInfo
    from training import sources
    from training.export import update_metadata
    from training.segment import evaluate_segmenter

    report = evaluate_segmenter(args.model, sources.read_manifest(args.manifest),
                                cache_dir=args.out / "cache")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.write_metadata:
        update_metadata(args.model, {"metrics": report["headline"]}, SegmentationInfo)
    print(json.dumps(report["headline"], indent=2))
    return 0


def cmd_demo_seg(args: argparse.Namespace) -> int:
    """Phantoms with masks -> manifest -> train-seg -> export-seg -> evaluate-seg -> ship."""
    from training.demo_seg import build_demo_segmenter

    figures = build_demo_segmenter(args.work, args.out, n_train=args.n_train,
                                   n_test=args.n_test, epochs=args.epochs, seed=args.seed,
                                   ship_below_target=args.ship_below_target)
    print(json.dumps(figures, indent=2))
    return 0


def _training_data_summary(records: list[Any]) -> str:
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        if r.split in ("train", "val"):
            counts.setdefault(r.source, {}).setdefault(r.label, 0)
            counts[r.source][r.label] += 1
    return "; ".join(
        f"{src}: " + ", ".join(f"{lab} {n}" for lab, n in sorted(c.items()))
        for src, c in sorted(counts.items())
    )


def cmd_export(args: argparse.Namespace) -> int:
    from cxrd.modelinfo import ModelInfo
    from cxrd.preprocess import STRETCH_V1
    from training import sources
    from training.data import load_images, to_inputs
    from training.export import export
    from training.model import build_classifier

    run = json.loads((args.run / "run.json").read_text())
    # The contract the run trained on (runs from before cxrd-gray8-stretch-v2 name none).
    preprocessing = run.get("preprocessing", STRETCH_V1)
    model = build_classifier(run["input_size"], str(args.run / "checkpoint.weights.h5"))
    records = _split(sources.read_manifest(args.manifest), "val")
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(records), size=min(32, len(records)), replace=False))
    samples = to_inputs(load_images([records[i] for i in pick], run["input_size"],
                                    preprocessing=preprocessing).images)
    info = ModelInfo(
        name=args.name,
        version=args.version,
        device_uid=run["device_uid"],
        input_size=run["input_size"],
        preprocessing=preprocessing,
        training_data=run["training_data"],
        demo=args.demo,
    )
    checks = export(
        model, args.out, info, samples, min_output_spread=0.0 if args.allow_untrained else 0.05
    )
    print(json.dumps(checks, indent=2))
    print(f"exported {args.out} ({info.display_name})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training import sources
    from training.evaluate import evaluate

    records = sources.read_manifest(args.manifest)
    report = evaluate(
        args.model,
        records,
        args.out,
        n_boot=args.bootstrap,
        write_metadata=args.write_metadata,
        progress=sys.stderr.isatty(),
        cache_dir=args.out / "cache",
        segmenter=args.segmenter,
        lung_margin=args.lung_margin,
    )
    print(json.dumps(report["headline"], indent=2))
    for split, rep in report["splits"].items():
        offsets = rep.get("pointing_game", {}).get("peak_offset")
        if offsets:  # median (x, y) from the CAM peak to the lesion, in CAM cells
            print(f"CAM peak offset from the lesion ({split}, cells):", json.dumps(offsets))
    if "operating_point" in report:
        print("TB operating point (validation):", json.dumps(report["operating_point"]))
    return 0


def cmd_demo_localisation(args: argparse.Namespace) -> int:
    from training.demo import demo_localisation

    figures = demo_localisation(args.work, n_test=args.n_test, seed=args.seed,
                                lung_margin=args.lung_margin,
                                write_metadata=args.write_metadata)
    print(json.dumps(figures, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Phantoms -> manifest -> train -> export -> evaluate on fresh phantoms -> ship."""
    from training.demo import build_demo

    figures = build_demo(
        args.work,
        args.out,
        n_train=args.n_train,
        n_test=args.n_test,
        seed=args.seed,
        ship_below_target=args.ship_below_target,
    )
    print(json.dumps(figures, indent=2))
    return 0


COMMANDS = {
    "index": cmd_index,
    "phantoms": cmd_phantoms,
    "train": cmd_train,
    "export": cmd_export,
    "evaluate": cmd_evaluate,
    "demo": cmd_demo,
    "demo-localisation": cmd_demo_localisation,
    "train-seg": cmd_train_seg,
    "export-seg": cmd_export_seg,
    "evaluate-seg": cmd_evaluate_seg,
    "demo-seg": cmd_demo_seg,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        cause = exc.__cause__
        while cause is not None:
            print(f"  caused by: {cause}", file=sys.stderr)
            cause = cause.__cause__
        return 2
