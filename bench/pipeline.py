#!/usr/bin/env python
"""End-to-end pipeline benchmark: watched folder -> SR + heatmap SC on disk.

For each variant (uncompressed, JPEG 2000 lossless) it generates N synthetic 2048x2500 CR
images (cached under ``--work``), starts ``cxrd serve`` as a subprocess on a fresh data
folder, drops the files into ``incoming/`` at once, waits until every study is reported,
stops the node with SIGTERM and prints throughput, per-study latency and per-stage times
read back from the node's SQLite database. When TensorFlow is importable (the ``[train]``
extra) it also times a naive per-image baseline (pydicom, min-max, Keras predict at batch
1, a matplotlib overlay) on the same files.

``--stage-only`` skips the daemon and runs the worker's stages in-process (no queue, no
watcher), which isolates decode / preprocess / infer / SC / write / SR and shows the
onnxruntime providers in use: the mode to run on a GPU machine.

Run ``python bench/pipeline.py --help``; see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: import cxrd, training
    sys.path.insert(0, str(ROOT))

ROWS, COLS = 2500, 2048
LABELS = ("TB", "NTB", "NORM")
VARIANTS = ("uncompressed", "j2k")
STAGES = ("decode", "preprocess", "infer", "sc", "write")
DEFAULT_PROVIDERS = "CUDAExecutionProvider,CPUExecutionProvider"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def utcnow() -> dt.datetime:
    """Naive UTC, as cxrd stores its timestamps."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def parse_ts(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


# --------------------------------------------------------------------------- statistics


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def summary(values: Sequence[float]) -> dict[str, float]:
    """mean / p50 / p95 / n of a list of seconds."""
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p95": float("nan"), "n": 0}
    return {"mean": float(np.mean(values)), "p50": pct(values, 50), "p95": pct(values, 95),
            "n": len(values)}


def ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.1f}"  # nan -> "-"


# --------------------------------------------------------------------------- input files


@dataclass(frozen=True)
class Inputs:
    variant: str
    files: list[Path]
    studies: int


def _write_atomic(ds: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)


def generate_inputs(cache: Path, n: int, per_study: int, seed: int,
                    variants: Sequence[str]) -> dict[str, Inputs]:
    """N phantoms in studies of ``per_study`` images, one file per variant, cached.

    The same phantom, patient and UIDs are written in every variant, so the variants
    differ only by their transfer syntax. A file already in the cache is reused.
    """
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    from training.phantoms import DicomOptions, make_phantom, random_patient_study, to_dataset

    syntaxes = {"uncompressed": ExplicitVRLittleEndian, "j2k": JPEG2000Lossless}
    studies = -(-n // per_study)
    out: dict[str, list[Path]] = {v: [] for v in variants}
    folder = {v: cache / f"{v}-{ROWS}x{COLS}-seed{seed}" for v in variants}
    for f in folder.values():
        f.mkdir(parents=True, exist_ok=True)
    made = 0
    t0 = time.perf_counter()
    for i in range(n):
        s, j = divmod(i, per_study)
        name = f"s{s:03d}_i{j:02d}.dcm"
        paths = {v: folder[v] / name for v in variants}
        for v in variants:
            out[v].append(paths[v])
        missing = [v for v in variants if not paths[v].exists()]
        if not missing:
            continue
        study = random_patient_study(np.random.default_rng([seed, s]))
        ph = make_phantom(np.random.default_rng([seed, s, j]), LABELS[i % len(LABELS)],
                          ROWS, COLS)
        series_uid = generate_uid(entropy_srcs=["cxrd-bench series", str(seed), str(s)])
        sop_uid = generate_uid(entropy_srcs=["cxrd-bench sop", str(seed), str(s), str(j)])
        for v in missing:
            ds = to_dataset(ph, study, DicomOptions(transfer_syntax=syntaxes[v]),
                            series_instance_uid=series_uid, sop_instance_uid=sop_uid,
                            instance_number=j + 1)
            _write_atomic(ds, paths[v])
            made += 1
        log(f"generated {name} ({', '.join(missing)}) {time.perf_counter() - t0:.1f} s")
    if made:
        log(f"generated {made} files in {time.perf_counter() - t0:.1f} s under {cache}")
    return {v: Inputs(v, out[v], studies) for v in variants}


# --------------------------------------------------------------------------- the daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, data_dir: Path, args: argparse.Namespace) -> None:
    providers = ", ".join(json.dumps(p) for p in args.providers)
    model = f"path = {json.dumps(str(Path(args.model).resolve()))}\n" if args.model else ""
    path.write_text(
        "# written by bench/pipeline.py\n"
        f"[node]\nport = {free_port()}\n\n"
        f"[storage]\ndata_dir = {json.dumps(str(data_dir))}\n\n"
        "[watch]\nsettle_seconds = 0.2\n\n"
        f"[study]\nstable_seconds = {args.stable_seconds:g}\n\n"
        f"[model]\n{model}providers = [{providers}]\n\n"
        f"[workers]\nprocesses = {args.processes}\nbatch_size = {args.batch_size}\n\n"
        '[metrics]\nlisten = ""\n\n'
        '[logging]\nlevel = "INFO"\n',
        encoding="utf-8")


class ReadOnlyDb:
    """The node's SQLite file, opened read-only (the node keeps writing it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection | None:
        if self.conn is None:
            if not self.path.exists():
                return None
            try:
                self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
                self.conn.row_factory = sqlite3.Row
            except sqlite3.Error:
                return None
        return self.conn

    def rows(self, sql: str, *params: Any) -> list[sqlite3.Row]:
        conn = self._connect()
        if conn is None:
            return []
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:  # tables not created yet, busy
            if "no such table" in str(exc) or "locked" in str(exc):
                return []
            raise

    def scalar(self, sql: str, *params: Any) -> Any:
        rows = self.rows(sql, *params)
        return rows[0][0] if rows else None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes], timeout: float = 90.0) -> tuple[int | None, float]:
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log("node did not drain in time: SIGKILL")
            proc.kill()
            proc.wait(10)
    return proc.returncode, time.monotonic() - t0


def run_daemon(inputs: Inputs, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Drop the files into a fresh node's incoming/ and measure until all are reported."""
    data_dir = run_dir / "data"
    staging = run_dir / "staging"  # same file system as incoming/: the drop is a rename
    incoming = data_dir / "incoming"
    for d in (staging, incoming):
        d.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(inputs.files):
        shutil.copyfile(f, staging / f"{i:04d}_{f.name}")
    config = run_dir / "cxrd.toml"
    write_config(config, data_dir, args)
    log_path = run_dir / "cxrd-serve.log"
    env = {k: v for k, v in os.environ.items() if k != "CXRD_CONFIG"}
    cmd = [sys.executable, "-m", "cxrd.cli", "serve", "--config", str(config)]
    log(f"{inputs.variant}: starting {' '.join(cmd[1:])}")
    db = ReadOnlyDb(data_dir / "cxrd.sqlite3")
    with log_path.open("wb") as log_fh:
        t_start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env,
                                cwd=str(ROOT))
        try:
            # Ready = every worker has written its heartbeat (model loaded, session made).
            while (db.scalar("SELECT count(*) FROM workers") or 0) < args.processes:
                if proc.poll() is not None:
                    raise RuntimeError(f"cxrd serve exited with {proc.returncode}:\n"
                                       f"{_tail(log_path)}")
                if time.monotonic() - t_start > 120:
                    raise RuntimeError(f"cxrd serve not ready after 120 s:\n{_tail(log_path)}")
                time.sleep(0.1)
            startup = time.monotonic() - t_start
            files = sorted(staging.iterdir())
            t_drop = utcnow()
            m_drop = time.monotonic()
            for f in files:
                os.replace(f, incoming / f.name)
            drop_seconds = time.monotonic() - m_drop
            log(f"{inputs.variant}: node ready in {startup:.1f} s; dropped {len(files)} files")
            finished = ("reported", "nothing-to-do")
            while True:
                done = db.scalar(
                    "SELECT count(*) FROM studies WHERE state IN (?, ?)", *finished) or 0
                rejected = db.scalar("SELECT count(*) FROM rejections") or 0
                if done >= inputs.studies:
                    break
                if rejected:
                    raise RuntimeError(f"{rejected} files were rejected at ingest:\n"
                                       f"{_tail(log_path)}")
                if proc.poll() is not None:
                    raise RuntimeError(f"cxrd serve exited with {proc.returncode}:\n"
                                       f"{_tail(log_path)}")
                if time.monotonic() - m_drop > args.timeout:
                    raise RuntimeError(f"only {done}/{inputs.studies} studies reported after "
                                       f"{args.timeout:g} s:\n{_tail(log_path)}")
                time.sleep(0.1)
            wait_seconds = time.monotonic() - m_drop
            metrics = collect_metrics(db, t_drop, len(inputs.files))
        finally:
            db.close()
            rc, drain = _stop(proc)
    metrics.update(startup_s=startup, drop_s=drop_seconds, wait_s=wait_seconds,
                   drain_s=drain, exit_code=rc, log=str(log_path))
    if rc != 0:
        log(f"{inputs.variant}: cxrd serve exited with {rc} after SIGTERM (see {log_path})")
    return metrics


def collect_metrics(db: ReadOnlyDb, t_drop: dt.datetime, n_files: int) -> dict[str, Any]:
    """Throughput, latency and stage times from the node's rows."""
    received = [parse_ts(r[0]) for r in db.rows("SELECT received_at FROM instances")]
    studies = db.rows("SELECT stable_at, reported_at, report_seconds, state, "
                      "(SELECT count(*) FROM jobs j WHERE j.study_instance_uid = "
                      "s.study_instance_uid AND j.state = 'done') AS images FROM studies s")
    jobs = db.rows("SELECT state, timings, finished_at FROM jobs")
    results = db.rows("SELECT kind, created_at FROM results")
    providers = sorted({r[0] for r in db.rows("SELECT providers FROM workers")})

    written = [parse_ts(r["created_at"]) for r in results]
    written += [parse_ts(r["reported_at"]) for r in studies if r["reported_at"]]
    last_written = max((w for w in written if w is not None), default=utcnow())
    stable = [parse_ts(r["stable_at"]) for r in studies if r["stable_at"]]
    first_stable = min((s for s in stable if s is not None), default=t_drop)
    latency = [(parse_ts(r["reported_at"]) - parse_ts(r["stable_at"])).total_seconds()
               for r in studies if r["reported_at"] and r["stable_at"]]
    stage_values: dict[str, list[float]] = {k: [] for k in STAGES}
    for r in jobs:
        if r["state"] == "done" and r["timings"]:
            timing = json.loads(r["timings"])
            for k in STAGES:
                if k in timing:
                    stage_values[k].append(float(timing[k]))
    sr = [float(r["report_seconds"]) for r in studies if r["report_seconds"] is not None]
    sr_per_image = [float(r["report_seconds"]) / r["images"] for r in studies
                    if r["report_seconds"] is not None and r["images"]]
    total = (last_written - t_drop).total_seconds()
    processing = (last_written - first_stable).total_seconds()
    received_ok = [r for r in received if r is not None]
    return {
        "images": n_files,
        "jobs_done": sum(r["state"] == "done" for r in jobs),
        "jobs_not_done": sum(r["state"] != "done" for r in jobs),
        "studies": len(studies),
        "sr_written": sum(r["kind"] == "sr" for r in results),
        "sc_written": sum(r["kind"] == "sc" for r in results),
        "wall_s": total,
        "images_per_s": n_files / total if total > 0 else float("nan"),
        "ingest_s": (max(received_ok) - t_drop).total_seconds() if received_ok else None,
        "first_stable_after_drop_s": (first_stable - t_drop).total_seconds(),
        "processing_s": processing,
        "processing_images_per_s": n_files / processing if processing > 0 else float("nan"),
        "latency_s": {"p50": pct(latency, 50), "p95": pct(latency, 95),
                      "max": max(latency, default=float("nan")), "n": len(latency)},
        "stages": {k: summary(v) for k, v in stage_values.items()},
        "sr_per_study": summary(sr),
        "sr_per_image": summary(sr_per_image),
        "worker_providers": providers,
    }


# --------------------------------------------------------------------------- stage-only


def run_stages(inputs: Inputs, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The worker's stages in-process, batch by batch, then one SR per study."""
    import pydicom

    from cxrd.infer import Classifier
    from cxrd.preprocess import decode_min_side, decode_pixels
    from cxrd.report import ImageResult, build_sr, save_dataset
    from cxrd.uids import derived_uid
    from cxrd.worker import prepare, write_heatmap

    results_dir = run_dir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    clf = Classifier(args.model or None, args.providers)
    size = clf.input_size
    bs = args.batch_size
    # Warm-up, untimed: the first session run (CUDA kernels) and the first SC and SR
    # (highdicom loads its tables on first use; the daemon pays this once per process).
    t = time.perf_counter()
    clf.run(np.zeros((bs, size, size, 3), dtype=np.float32))
    scratch = run_dir / "warm-up"
    p = prepare(inputs.files[0], size)
    probs, cams = clf.run(p.model_input[None])
    write_heatmap(p, probs[0], cams[0], clf.info, scratch, 1)
    build_sr([ImageResult(p.dataset, np.zeros((1, 1), dtype=np.uint8), probs[0], cams[0])],
             clf.info)
    shutil.rmtree(scratch, ignore_errors=True)
    # The resolution prepare() decodes at (JPEG 2000: reduced, see cxrd.preprocess).
    min_side = decode_min_side(size)
    decoded = decode_pixels(pydicom.dcmread(inputs.files[0]), min_side=min_side).shape
    warm_up = time.perf_counter() - t
    stage_values: dict[str, list[float]] = {k: [] for k in STAGES}
    outputs: dict[str, list[tuple[Path, np.ndarray, np.ndarray]]] = {}
    t0 = time.perf_counter()
    for start in range(0, len(inputs.files), bs):
        batch = inputs.files[start:start + bs]
        preps = [prepare(f, size) for f in batch]
        t = time.perf_counter()
        probs, cams = clf.run(np.stack([p.model_input for p in preps]))
        infer = (time.perf_counter() - t) / len(preps)
        for i, (f, p) in enumerate(zip(batch, preps, strict=True)):
            p.timings["infer"] = infer
            write_heatmap(p, probs[i], cams[i], clf.info, results_dir, 1)
            for k in STAGES:
                stage_values[k].append(p.timings[k])
            outputs.setdefault(str(p.dataset.StudyInstanceUID), []).append(
                (f, probs[i], cams[i]))
    sr_seconds, sr_per_image = [], []
    for study_uid, items in outputs.items():
        t = time.perf_counter()
        images = [ImageResult(pydicom.dcmread(f, stop_before_pixels=True),
                              np.zeros((1, 1), dtype=np.uint8), p, c) for f, p, c in items]
        sr = build_sr(images, clf.info, sop_instance_uid=derived_uid("bench-sr", study_uid),
                      series_instance_uid=derived_uid("bench-sr-series", study_uid))
        save_dataset(sr, results_dir)
        sr_seconds.append(time.perf_counter() - t)
        sr_per_image.append(sr_seconds[-1] / len(items))
    wall = time.perf_counter() - t0
    return {
        "images": len(inputs.files),
        "wall_s": wall,
        "images_per_s": len(inputs.files) / wall,
        "input_size": size,
        "providers": clf.providers,
        "warm_up_s": warm_up,
        "decoded_shape": [int(n) for n in decoded],
        "decode_min_side": min_side,
        "stages": {k: summary(v) for k, v in stage_values.items()},
        "sr_per_study": summary(sr_seconds),
        "sr_per_image": summary(sr_per_image),
    }


# --------------------------------------------------------------------------- baseline


def tensorflow_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


class Baseline:
    """The naive research pipeline: one image at a time, Keras at batch 1, matplotlib."""

    def __init__(self, size: int) -> None:
        import matplotlib

        matplotlib.use("Agg")
        from training.model import build_classifier  # sets the TF env guards (no XLA)

        self.size = size
        t = time.perf_counter()
        self.model = build_classifier(size)
        self.model.predict(np.zeros((1, size, size, 3), dtype=np.float32), verbose=0)
        self.build_s = time.perf_counter() - t
        # A CAM-like 7x7 map; the overlay's cost does not depend on its values.
        self.heat = np.random.default_rng(0).random((7, 7)).astype(np.float32)

    def run(self, files: Sequence[Path], out_dir: Path) -> dict[str, Any]:
        import matplotlib.pyplot as plt
        import pydicom
        from PIL import Image

        out_dir.mkdir(parents=True, exist_ok=True)
        steps: dict[str, list[float]] = {"decode": [], "preprocess": [], "predict": [],
                                         "overlay": []}
        t_all = time.perf_counter()
        for i, f in enumerate(files):
            t0 = time.perf_counter()
            ds = pydicom.dcmread(f)
            pixels = ds.pixel_array
            t1 = time.perf_counter()
            img = pixels.astype(np.float32)
            img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
            small = np.asarray(Image.fromarray(img).resize((self.size, self.size),
                                                           Image.Resampling.BILINEAR))
            x = np.repeat((small * 2.0 - 1.0)[None, ..., None], 3, axis=-1)
            t2 = time.perf_counter()
            self.model.predict(x, verbose=0)
            t3 = time.perf_counter()
            fig, ax = plt.subplots()
            ax.imshow(img, cmap="gray")
            ax.imshow(self.heat, cmap="jet", alpha=0.4, interpolation="bilinear",
                      extent=(0, img.shape[1], img.shape[0], 0))
            ax.axis("off")
            fig.savefig(out_dir / f"{i:04d}.png")
            plt.close(fig)
            t4 = time.perf_counter()
            for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                steps[k].append(v)
        wall = time.perf_counter() - t_all
        return {"images": len(files), "wall_s": wall, "images_per_s": len(files) / wall,
                "size": self.size, "steps": {k: summary(v) for k, v in steps.items()}}


# --------------------------------------------------------------------------- printing


def print_header(args: argparse.Namespace, info: dict[str, Any]) -> None:
    print("cxrd pipeline benchmark")
    print(f"  images      {args.n} x {ROWS}x{COLS} CR, {args.per_study} per study")
    print(f"  model       {info['model']} (input {info['input_size']}px"
          f"{', demo' if info['demo'] else ''})")
    print(f"  providers   asked {','.join(args.providers)}; in use {','.join(info['providers'])}")
    mode = "in-process stages (--stage-only)" if args.stage_only else (
        f"cxrd serve, processes={args.processes}, batch_size={args.batch_size}, "
        f"stable_seconds={args.stable_seconds:g}, settle_seconds=0.2")
    print(f"  mode        {mode}")
    print(f"  cpus        {os.cpu_count()}")


def print_stage_table(m: dict[str, Any]) -> None:
    print(f"    {'stage':<12}{'mean ms':>10}{'p50 ms':>10}{'p95 ms':>10}{'n':>6}")
    total = 0.0
    for k in STAGES:
        s = m["stages"][k]
        total += s["mean"] if s["n"] else 0.0
        print(f"    {k:<12}{ms(s['mean']):>10}{ms(s['p50']):>10}{ms(s['p95']):>10}{s['n']:>6}")
    s = m["sr_per_image"]
    total += s["mean"] if s["n"] else 0.0
    print(f"    {'SR/image':<12}{ms(s['mean']):>10}{ms(s['p50']):>10}{ms(s['p95']):>10}{s['n']:>6}"
          "   (study SR time / its images)")
    s = m["sr_per_study"]
    print(f"    {'SR/study':<12}{ms(s['mean']):>10}{ms(s['p50']):>10}{ms(s['p95']):>10}{s['n']:>6}")
    print(f"    {'sum/image':<12}{ms(total):>10}{'':>10}{'':>10}{'':>6}"
          f"   (serial work per image -> {1 / total if total else float('nan'):.1f} images/s "
          "per busy core)")


def print_daemon(variant: str, m: dict[str, Any]) -> None:
    print(f"\n== {variant}: cxrd serve, watched folder -> SR + SC ==")
    print(f"  images/s      {m['images_per_s']:.2f}   ({m['images']} images, first file "
          f"dropped -> last result written {m['wall_s']:.2f} s)")
    print(f"  processing    {m['processing_images_per_s']:.2f} images/s   (first study stable"
          f" -> last result {m['processing_s']:.2f} s; excludes the stable_seconds wait)")
    print(f"  timeline      all ingested +{m['ingest_s']:.2f} s, first study stable "
          f"+{m['first_stable_after_drop_s']:.2f} s, last result +{m['wall_s']:.2f} s")
    lat = m["latency_s"]
    print(f"  latency       stable -> results written, per study: p50 {lat['p50']:.2f} s, "
          f"p95 {lat['p95']:.2f} s, max {lat['max']:.2f} s (n={lat['n']})")
    print(f"  written       {m['sc_written']} SC, {m['sr_written']} SR; jobs done "
          f"{m['jobs_done']}, not done {m['jobs_not_done']}")
    print(f"  node          ready in {m['startup_s']:.1f} s, drained in {m['drain_s']:.1f} s "
          f"(exit {m['exit_code']}); worker providers {', '.join(m['worker_providers'])}")
    print("  per-image stage times (Job.timings; SR from Study.report_seconds):")
    print_stage_table(m)


def print_stage_only(variant: str, m: dict[str, Any]) -> None:
    print(f"\n== {variant}: in-process stages (no queue, no watcher) ==")
    print(f"  images/s      {m['images_per_s']:.2f}   ({m['images']} images in "
          f"{m['wall_s']:.2f} s, one process)")
    print(f"  providers     {', '.join(m['providers'])} (input {m['input_size']}px); "
          f"untimed warm-up {m['warm_up_s']:.2f} s")
    rows, cols = m["decoded_shape"]
    how = "full" if (rows, cols) == (ROWS, COLS) else "reduced JPEG 2000"
    print(f"  decoded at    {rows}x{cols} of {ROWS}x{COLS} ({how} decode; min_side "
          f"{m['decode_min_side']})")
    print_stage_table(m)


def print_baseline(variant: str, b: dict[str, Any], cxrd: dict[str, Any],
                   stage_only: bool) -> None:
    print(f"\n== {variant}: naive baseline (pydicom + min-max + Keras predict batch 1 + "
          "matplotlib overlay) ==")
    print(f"  images/s      {b['images_per_s']:.2f}   ({b['images']} images in "
          f"{b['wall_s']:.2f} s, Keras input {b['size']}px)")
    print(f"    {'step':<12}{'mean ms':>10}{'p50 ms':>10}{'p95 ms':>10}")
    for k, s in b["steps"].items():
        print(f"    {k:<12}{ms(s['mean']):>10}{ms(s['p50']):>10}{ms(s['p95']):>10}")
    ratio = cxrd["images_per_s"] / b["images_per_s"]
    what = "in-process" if stage_only else "end-to-end"
    print(f"  cxrd/baseline {ratio:.2f}x ({what} cxrd {cxrd['images_per_s']:.2f} images/s)")
    if not stage_only:
        r2 = cxrd["processing_images_per_s"] / b["images_per_s"]
        print(f"                {r2:.2f}x excluding the stable_seconds wait")


# --------------------------------------------------------------------------- main


def _plain(value: Any) -> Any:
    """JSON-safe: NaN becomes null, paths and numpy scalars plain values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if value != value else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, str | int | bool) or value is None:
        return value
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Benchmark cxrd from the watched folder to SR + SC on disk, per "
                    "transfer syntax, against a naive Keras/matplotlib baseline.")
    p.add_argument("--n", type=int, default=16, help="images per variant (default 16)")
    p.add_argument("--per-study", type=int, default=4, help="images per study (default 4)")
    p.add_argument("--variants", default="uncompressed,j2k",
                   help="comma-separated: uncompressed, j2k (default both)")
    p.add_argument("--processes", type=int, default=1, help="workers.processes (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="workers.batch_size (default 8)")
    p.add_argument("--model", help="ONNX model file (default: the embedded demo model)")
    p.add_argument("--providers", default=DEFAULT_PROVIDERS,
                   help=f"onnxruntime providers in order (default {DEFAULT_PROVIDERS})")
    p.add_argument("--stable-seconds", type=float, default=1.0,
                   help="study.stable_seconds for the node (default 1)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cxrd-bench",
                   help="work folder: cache/ holds generated inputs, runs/ the node data "
                        "(default $TMPDIR/cxrd-bench)")
    p.add_argument("--keep", action="store_true",
                   help="keep each run's data folder (spool, results, DB, log)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write every number as JSON")
    p.add_argument("--stage-only", action="store_true",
                   help="skip the daemon: run prepare/infer/SC/write/SR in-process")
    p.add_argument("--no-baseline", action="store_true", help="skip the Keras baseline")
    p.add_argument("--baseline-size", type=int, default=224,
                   help="Keras baseline input size (default 224, the founding model's)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for all studies per variant (default 600)")
    p.add_argument("--seed", type=int, default=7, help="phantom seed (default 7)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        print(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.n < 1 or args.per_study < 1 or args.processes < 1 or args.batch_size < 1:
        print("--n, --per-study, --processes and --batch-size must be >= 1", file=sys.stderr)
        return 2

    from cxrd.infer import Classifier

    clf = Classifier(args.model or None, args.providers)  # input size and providers in use
    info = {"model": clf.info.display_name, "input_size": clf.input_size,
            "demo": clf.info.demo, "providers": clf.providers, "path": str(clf.path)}
    del clf

    args.work.mkdir(parents=True, exist_ok=True)
    inputs = generate_inputs(args.work / "cache", args.n, args.per_study, args.seed,
                             args.variants)
    runs = args.work / "runs"
    runs.mkdir(exist_ok=True)
    report: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v
                                       for k, v in vars(args).items()},
                              "model": info, "cpus": os.cpu_count(), "variants": {}}
    run_one: Callable[[Inputs, Path, argparse.Namespace], dict[str, Any]] = (
        run_stages if args.stage_only else run_daemon)
    failed = False
    for v in args.variants:
        run_dir = Path(tempfile.mkdtemp(prefix=f"{v}-", dir=runs))
        try:
            report["variants"][v] = {"cxrd": run_one(inputs[v], run_dir, args),
                                     "run_dir": str(run_dir)}
        except RuntimeError as exc:
            failed = True
            log(f"{v}: FAILED: {exc}\n(kept {run_dir})")
            continue
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)

    baseline_note = "skipped (--no-baseline)"
    if not args.no_baseline and report["variants"]:
        if tensorflow_available():
            log("baseline: building the Keras model (TensorFlow import takes a while)")
            base = Baseline(args.baseline_size)
            report["baseline_build_s"] = base.build_s
            for v, entry in report["variants"].items():
                with tempfile.TemporaryDirectory(dir=runs) as tmp:
                    log(f"{v}: baseline over {len(inputs[v].files)} images")
                    entry["baseline"] = base.run(inputs[v].files, Path(tmp))
            baseline_note = ""
        else:
            baseline_note = ("skipped: TensorFlow is not importable (install the [train] "
                             "extra to time the naive baseline)")

    print_header(args, info)
    for v, entry in report["variants"].items():
        (print_stage_only if args.stage_only else print_daemon)(v, entry["cxrd"])
        if "baseline" in entry:
            print_baseline(v, entry["baseline"], entry["cxrd"], args.stage_only)
    if baseline_note:
        print(f"\nbaseline {baseline_note}")
        report["baseline_note"] = baseline_note
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_plain(report), indent=2, allow_nan=False) + "\n")
        log(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
