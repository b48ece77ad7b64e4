"""Check that the model input stays bit-identical across a change to ``cxrd.preprocess``.

Every model was trained on ``cxrd.preprocess``'s output under the contract it declares, so
a speed-up there must not change a single value of any contract. Record the digests with
the tree before the change, check them with the tree after it:

    .venv/bin/python bench/preprocess_identity.py record /tmp/ids.json   # before
    .venv/bin/python bench/preprocess_identity.py check /tmp/ids.json    # after

The inputs: the benchmark's cached 2048x2500 radiographs (``bench/pipeline.py``, every
variant found under ``--cache``), every file pydicom ships as test data, and synthetic
images covering the preprocessing's branches (windows LINEAR, LINEAR_EXACT and SIGMOID,
no window (percentile), VOI LUT and Modality LUT Sequences, rescale, MONOCHROME1, signed,
8- and 16-bit, unused high bits set, narrow and wide windows). Files are read as the worker
reads them (``cxrd.preprocess.read_dicom``, which maps native Pixel Data). Per input it
records a SHA-256 of ``dataset_to_gray8`` and of the model input at 224 px under each
contract of ``cxrd.preprocess.CONTRACTS`` (``to_model_input(contract.resize(...))``), for
the full decode and for the worker's reduced decode (``decode_min_side(224)``), or the
error raised. ``cxrd-gray8-stretch-v1``'s keys are ``NAME [full]`` and ``NAME [worker]``
(as in trees from before there were other contracts); another contract's add its name,
``NAME [full, cxrd-gray8-stretch-v2]``. ``check`` fails when a recorded digest differs or is
missing; digests the record lacks (a contract added since) are listed and not compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: import cxrd
    sys.path.insert(0, str(ROOT))

SIZE = 224
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "cxrd-bench" / "cache"


def _digest(arr: np.ndarray) -> str:
    a = np.ascontiguousarray(arr)
    return hashlib.sha256(f"{a.dtype}{a.shape}".encode() + a.tobytes()).hexdigest()[:24]


def _synthetic() -> Iterator[tuple[str, Callable[[], object]]]:
    """Synthetic data sets, one per branch of the preprocessing."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def make(seed: int, *, rows: int = 300, cols: int = 260, bits: int = 12,
             signed: bool = False, allocated: int = 16, photometric: str = "MONOCHROME2",
             garbage: bool = False, **attrs: object) -> Dataset:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:rows, 0:cols]
        top = 2 ** bits
        base = (xx * 37 + yy * 11) % top + rng.integers(0, max(1, top // 8), (rows, cols))
        values = np.clip(base, 0, top - 1)
        if signed:
            values = values - top // 2
            dtype = np.int16 if allocated == 16 else np.int8
        else:
            dtype = np.uint16 if allocated == 16 else np.uint8
        arr = values.astype(dtype)
        if garbage:  # bits above Bits Stored set: pydicom masks them off
            arr = arr | dtype(1 << bits)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(seed)])
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits, bits - 1
        ds.PixelRepresentation = int(signed)
        for keyword, value in attrs.items():
            setattr(ds, keyword, value)
        ds.PixelData = arr.tobytes()
        return ds

    def voi_lut() -> Sequence:
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 12]
        item.LUTData = [int(v) for v in (np.sqrt(np.arange(4096) / 4095) * 4095)]
        return Sequence([item])

    def modality_lut() -> Sequence:
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        item.ModalityLUTType = "US"
        item.LUTData = [int(v) for v in (np.arange(4096) * 3 + 100)]
        return Sequence([item])

    cases: dict[str, Callable[[], Dataset]] = {
        "linear-full": lambda: make(1, WindowCenter=2048, WindowWidth=4096),
        "linear-narrow": lambda: make(2, WindowCenter=1500, WindowWidth=800),
        "linear-odd": lambda: make(3, WindowCenter=1234.5, WindowWidth=3001),
        "linear-width1": lambda: make(4, WindowCenter=2000, WindowWidth=1),
        "linear-exact": lambda: make(5, WindowCenter=2000, WindowWidth=2500,
                                     VOILUTFunction="LINEAR_EXACT"),
        "sigmoid": lambda: make(6, WindowCenter=2000, WindowWidth=2500,
                                VOILUTFunction="SIGMOID"),
        "percentile": lambda: make(7),
        "percentile-mono1": lambda: make(8, photometric="MONOCHROME1"),
        "linear-mono1": lambda: make(9, photometric="MONOCHROME1", WindowCenter=2048,
                                     WindowWidth=4096),
        "rescale": lambda: make(10, RescaleSlope=0.5, RescaleIntercept=-1024,
                                WindowCenter=0, WindowWidth=1500),
        "rescale-percentile": lambda: make(11, RescaleSlope=2, RescaleIntercept=7),
        "signed": lambda: make(12, signed=True, WindowCenter=0, WindowWidth=3000),
        "signed-percentile": lambda: make(13, signed=True),
        "16-bit": lambda: make(14, bits=16, WindowCenter=30000, WindowWidth=40000),
        "16-bit-narrow": lambda: make(15, bits=16, WindowCenter=30000, WindowWidth=500),
        "16-bit-percentile": lambda: make(16, bits=16),
        "14-bit": lambda: make(17, bits=14, WindowCenter=8000, WindowWidth=12000),
        "10-bit": lambda: make(18, bits=10, WindowCenter=512, WindowWidth=1024),
        "8-bit": lambda: make(19, bits=8, allocated=8, WindowCenter=128, WindowWidth=256),
        "8-bit-percentile": lambda: make(20, bits=8, allocated=8),
        "garbage-high-bits": lambda: make(21, garbage=True, WindowCenter=2048,
                                          WindowWidth=4096),
        "voi-lut-sequence": lambda: make(22, VOILUTSequence=voi_lut()),
        "modality-lut-sequence": lambda: make(23, ModalityLUTSequence=modality_lut(),
                                              WindowCenter=6000, WindowWidth=10000),
        "multi-window": lambda: make(24, WindowCenter=[2048, 1000], WindowWidth=[4096, 500]),
        "constant": lambda: make(25, bits=1, WindowCenter=0, WindowWidth=2),
        "large": lambda: make(26, rows=2500, cols=2048, WindowCenter=2048, WindowWidth=4096),
    }
    yield from cases.items()


def _inputs(cache: Path) -> Iterator[tuple[str, Callable[[], object]]]:
    import pydicom
    from pydicom.data import get_testdata_files

    from cxrd import preprocess

    # Files are read as the worker reads them (read_dicom maps native Pixel Data; a tree
    # from before it has none and reads them whole).
    read = getattr(preprocess, "read_dicom", pydicom.dcmread)
    for path in sorted(cache.glob("*/*.dcm")):
        yield f"bench:{path.parent.name}/{path.name}", lambda p=path: read(p)
    for name in sorted(get_testdata_files("*.dcm")):
        yield f"pydicom:{Path(name).name}", lambda p=name: read(p)
    yield from ((f"synthetic:{k}", v) for k, v in _synthetic())


V1 = "cxrd-gray8-stretch-v1"


def digests(cache: Path) -> dict[str, str]:
    from cxrd.preprocess import (
        CONTRACTS,
        dataset_to_gray8,
        decode_min_side,
        decode_pixels,
        to_model_input,
    )

    out: dict[str, str] = {}
    for name, load in _inputs(cache):
        for label, min_side in (("full", None), ("worker", decode_min_side(SIZE))):
            keys = {c: f"{name} [{label}]" if c == V1 else f"{name} [{label}, {c}]"
                    for c in CONTRACTS}
            try:
                ds = load()
                gray = dataset_to_gray8(ds, decode_pixels(ds, min_side=min_side))  # type: ignore[arg-type]
            except Exception as exc:  # the same error, or lack of one, is part of the contract
                out.update(dict.fromkeys(keys.values(), f"error {type(exc).__name__}"))
                continue
            for c, key in keys.items():
                x = to_model_input(CONTRACTS[c].resize(gray, SIZE))
                out[key] = f"gray8 {_digest(gray)} input {_digest(x)}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("record", "check"))
    p.add_argument("file", type=Path, help="JSON file of digests")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help=f"bench/pipeline.py's input cache (default {DEFAULT_CACHE})")
    args = p.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")  # pydicom's test files warn about their oddities
    now = digests(args.cache)
    if args.mode == "record":
        args.file.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        errors = sum(v.startswith("error") for v in now.values())
        print(f"recorded {len(now)} digests ({errors} errors) in {args.file}")
        return 0
    before = json.loads(args.file.read_text())
    differ = sorted(k for k in before.keys() & now.keys() if before[k] != now[k])
    missing = sorted(before.keys() - now.keys())
    new = sorted(now.keys() - before.keys())
    for key in differ:
        print(f"DIFFERS {key}: {before[key]} -> {now[key]}")
    for key in missing:
        print(f"MISSING {key}")
    same = len(before.keys() & now.keys()) - len(differ)
    print(f"{same} identical, {len(differ)} differ, {len(missing)} missing, "
          f"{len(new)} new (not in the record, not compared)")
    return 1 if differ or missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
