"""Index the public chest X-ray sets into one manifest of TB / NTB / NORM records.

The user downloads each set; every indexer follows the set's published folder layout and
accepts either the dataset folder itself or a folder containing it (a few levels up). A
missing or empty tree raises ``FileNotFoundError`` naming the layout that was expected.
Files that are not used are counted by reason in ``IndexResult.skipped``; facts worth a
look that do not drop a file (a missing clinical reading, no patient id) go in
``IndexResult.notes``.

Layouts (``root`` may be the folder shown or any parent up to a few levels):

``shenzhen``   ``ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png`` (``_0`` normal, ``_1`` TB),
               ``ChinaSet_AllFiles/ClinicalReadings/CHNCXR_0001_0.txt``. Patient = ``0001``.
               Lung masks, when the separate Shenzhen lung-mask release lies under the
               folder given (a folder whose name contains "mask" holding
               ``CHNCXR_0001_0_mask.png``: one mask for both lungs), go into
               ``lung_masks`` as one union, split into left and right by
               ``training.masks.split_lungs``; images without one are noted.
``montgomery`` ``MontgomerySet/CXR_png/MCUCXR_0001_0.png``, ``ClinicalReadings/*.txt``;
               ``ManualMask/{leftMask,rightMask}/MCUCXR_0001_0.png`` (lung masks, same
               names) go into ``lung_masks`` as a union too: whether "left" is the
               patient's could not be confirmed from the set's documentation, so the
               sides are taken from the image (``split_lungs``), not from the folder names.
``tbx11k``     ``TBX11K/imgs/{health,sick,tb}/*.png``, ``TBX11K/lists/TBX11K_{train,val}.txt``
               (or ``all_{train,val}.txt``) with lines like ``tb/tb0003.png``. ``imgs/test``
               has no labels and ``imgs/extra`` holds other public sets (Montgomery and
               Shenzhen among them, our external test): both are skipped and counted.
               TBX11K publishes no patient ids, so each image is its own group. The TB
               boxes of ``annotations/xml/tb0003.xml`` (Pascal VOC, every ``object``'s
               ``bndbox``) go into ``boxes`` (see :func:`read_voc_boxes`); the COCO
               ``annotations/json`` files hold the same boxes and are not read.
``kermany``    ``chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/*.jpeg``; the Kaggle zip's
               nested duplicate ``chest_xray/chest_xray`` is merged (same file twice is
               counted as ``duplicate_copy``) and ``__MACOSX`` is ignored. Patient =
               ``person123`` (pneumonia) or ``IM-0115`` / ``NORMAL2-IM-1427`` (normal).
``nih_tb``     a folder of images (png/jpg/dcm, any depth) and a metadata CSV naming each
               file and its patient; all TB. Rows without a file on disk and files without
               a row are counted (and logged), not fatal.
``phantom``    our synthetic set: ``ground_truth.csv`` with ``path,label,boxes,...,
               study_instance_uid,...``; ``path`` relative to the CSV. Patient = study UID.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from training.masks import sides_spec, union_spec

log = logging.getLogger(__name__)

LABELS: tuple[str, ...] = ("TB", "NTB", "NORM")
#: Targets a label map may use; "" drops the source label.
_TARGETS = frozenset((*LABELS, ""))
SPLITS: tuple[str, ...] = ("train", "val", "test")
SOURCES: tuple[str, ...] = ("nih_tb", "tbx11k", "kermany", "shenzhen", "montgomery", "phantom")
DEFAULT_TEST_SOURCES: tuple[str, ...] = ("shenzhen", "montgomery")

LABEL_MAP_DEFAULT: dict[str, dict[str, str]] = {
    "nih_tb": {"TB": "TB"},
    "tbx11k": {"tb": "TB", "sick": "NTB", "health": "NORM"},
    "kermany": {"PNEUMONIA": "NTB", "NORMAL": "NORM"},
    "shenzhen": {"1": "TB", "0": "NORM"},
    "montgomery": {"1": "TB", "0": "NORM"},
    "phantom": {"TB": "TB", "NTB": "NTB", "NORM": "NORM"},
}

LabelMap = Mapping[str, Mapping[str, str]]

_IMAGE_EXTS = frozenset((".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff"))
_SYSTEM_JUNK = frozenset(("thumbs.db", "desktop.ini", ".ds_store"))


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """One image in the manifest."""

    path: str  # absolute
    source: str
    source_label: str
    label: str  # TB / NTB / NORM
    patient_id: str  # "" when the set does not say
    split: str = ""  # train / val / test, set by assign_splits
    boxes: str = ""  # JSON list of inclusive [x0, y0, x1, y1] lesion boxes (phantoms, TBX11K)
    official_split: str = ""  # the set's own train/val/test assignment, a hint only
    lung_masks: str = ""  # JSON naming the lung-field mask files (training.masks), "" = none


MANIFEST_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Record))
_REQUIRED_COLUMNS = ("path", "source", "source_label", "label", "patient_id")


@dataclass
class IndexResult:
    """What one indexer found."""

    records: list[Record] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> files not used
    notes: dict[str, int] = field(default_factory=dict)  # reason -> files used, but look
    root: Path | None = None  # the dataset folder that was found

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def note(self, reason: str, n: int = 1) -> None:
        if n:
            self.notes[reason] = self.notes.get(reason, 0) + n


# --------------------------------------------------------------------------- label maps


def validate_label_map(label_map: Mapping[str, Any], *, origin: str = "label map") -> None:
    """Raise ValueError when a source key or target label is not allowed."""
    if not isinstance(label_map, Mapping):
        raise ValueError(f"The {origin} must be a JSON object of source -> {{label: target}}.")
    for source, mapping in label_map.items():
        if source not in LABEL_MAP_DEFAULT:
            raise ValueError(
                f"Unknown source {source!r} in the {origin}; known sources are "
                f"{', '.join(sorted(LABEL_MAP_DEFAULT))}."
            )
        if not isinstance(mapping, Mapping):
            raise ValueError(
                f"The {origin} entry for {source!r} must be an object of source label -> target."
            )
        for source_label, target in mapping.items():
            if not isinstance(source_label, str) or not isinstance(target, str):
                raise ValueError(
                    f"The {origin} entry {source!r} -> {source_label!r} must map a string to a "
                    "string."
                )
            if target not in _TARGETS:
                raise ValueError(
                    f"The {origin} maps {source!r} label {source_label!r} to {target!r}, which is "
                    'not one of TB, NTB, NORM or "" (drop).'
                )


def load_label_map(path: Path | None) -> dict[str, dict[str, str]]:
    """The default label map, with the entries of the JSON file at ``path`` merged over it.

    The file looks like ``{"kermany": {"PNEUMONIA": ""}}``: per source, source label ->
    TB / NTB / NORM, or "" to drop those images. Entries not named keep their default.
    """
    merged = copy.deepcopy(LABEL_MAP_DEFAULT)
    if path is None:
        return merged
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"The label map file {path} is not valid JSON: {exc}.") from exc
    validate_label_map(data, origin=f"label map file {path}")
    for source, mapping in data.items():
        merged[source].update(mapping)
    return merged


def _source_map(label_map: Mapping[str, Any] | None, source: str) -> Mapping[str, str]:
    """The per-source map, from a full map (source -> map), a per-source map, or None."""
    if label_map is None:
        return LABEL_MAP_DEFAULT[source]
    if label_map and all(isinstance(v, str) for v in label_map.values()):
        validate_label_map({source: label_map})
        return label_map
    validate_label_map(label_map)
    if source in label_map:
        per_source: Mapping[str, str] = label_map[source]
        return per_source
    return LABEL_MAP_DEFAULT[source]


def _map_label(result: IndexResult, mapping: Mapping[str, str], source_label: str) -> str | None:
    """The target label, or None (counted in skipped) when unmapped or dropped."""
    target = mapping.get(source_label)
    if target is None:
        result.skip(f"unmapped_label:{source_label}")
        return None
    if target == "":
        result.skip(f"dropped_by_label_map:{source_label}")
        return None
    return target


# --------------------------------------------------------------------------- file walking


def _is_junk(name: str) -> bool:
    """macOS/Windows debris: dot-files (incl. ``._x`` forks), ``__MACOSX``, Thumbs.db."""
    return name.startswith(".") or name == "__MACOSX" or name.lower() in _SYSTEM_JUNK


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in _IMAGE_EXTS


def _subdirs(d: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError:
        return []
    return [Path(e.path) for e in entries if e.is_dir() and not _is_junk(e.name)]


def _files(d: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError:
        return []
    return [Path(e.path) for e in entries if e.is_file()]


def _walk_dirs(root: Path, max_depth: int) -> Iterator[tuple[Path, int]]:
    """Breadth-first (dir, depth) from root, skipping junk folders."""
    level = [root]
    for depth in range(max_depth + 1):
        nxt: list[Path] = []
        for d in level:
            yield d, depth
            if depth < max_depth:
                nxt.extend(_subdirs(d))
        level = nxt


def _walk_files(root: Path) -> Iterator[Path]:
    """Every file under root (sorted, any depth), junk folders pruned; junk files included."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(n for n in dirnames if not _is_junk(n))
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _check_root(root: Path, what: str, layout: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"The {what} folder {root} does not exist or is not a folder; expected {layout}."
        )
    return root.resolve()


def _abs(p: Path) -> str:
    return str(p.resolve())


def _empty(p: Path) -> bool:
    try:
        return p.stat().st_size == 0
    except OSError:
        return True


# --------------------------------------------------------------------------- Shenzhen, Montgomery

_NLM_SETS: dict[str, tuple[re.Pattern[str], str, str]] = {
    "shenzhen": (
        re.compile(r"^CHNCXR_(\d{4})_([01])\.png$", re.IGNORECASE),
        "Shenzhen",
        "ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png (_0 normal, _1 TB) under the folder given "
        "(pass ChinaSet_AllFiles or its parent)",
    ),
    "montgomery": (
        re.compile(r"^MCUCXR_(\d{4})_([01])\.png$", re.IGNORECASE),
        "Montgomery",
        "MontgomerySet/CXR_png/MCUCXR_0001_0.png (_0 normal, _1 TB) under the folder given "
        "(pass MontgomerySet or its parent)",
    ),
}


_SHENZHEN_MASK = re.compile(r"^(CHNCXR_\d{4}_[01])_mask\.png$", re.IGNORECASE)


def _montgomery_masks(root: Path, image_dirs: Sequence[Path]) -> dict[str, str]:
    """Image name (upper case) -> ``lung_masks``, from ``ManualMask/{left,right}Mask``
    beside each image folder; a mask missing on one side leaves the image without."""
    out: dict[str, str] = {}
    for d in image_dirs:
        left_dir, right_dir = (d.parent / "ManualMask" / n for n in ("leftMask", "rightMask"))
        for f in _files(left_dir):
            other = right_dir / f.name
            if not _is_junk(f.name) and other.is_file():
                out.setdefault(f.name.upper(), union_spec([_abs(f), _abs(other)]))
    return out


def _shenzhen_masks(root: Path, image_dirs: Sequence[Path]) -> dict[str, str]:
    """Image name (upper case) -> ``lung_masks``, from ``*mask*/CHNCXR_NNNN_N_mask.png``
    anywhere under root (a few levels down)."""
    out: dict[str, str] = {}
    for d, _ in _walk_dirs(root, 4):
        if "mask" not in d.name.lower():
            continue
        for f in _files(d):
            m = _SHENZHEN_MASK.match(f.name)
            if m is not None:
                out.setdefault(f"{m.group(1)}.png".upper(), union_spec([_abs(f)]))
    return out


def _index_nlm(root: Path, label_map: Mapping[str, Any] | None, source: str) -> IndexResult:
    pattern, what, layout = _NLM_SETS[source]
    root = _check_root(root, what, layout)
    mapping = _source_map(label_map, source)
    # Image folders: directly hold files named like the set, not a mask folder.
    candidates: list[tuple[int, int, Path]] = []
    for d, depth in _walk_dirs(root, 4):
        if "mask" in d.name.lower():
            continue
        if any(pattern.match(f.name) for f in _files(d)):
            candidates.append((depth, 0 if d.name == "CXR_png" else 1, d))
    if not candidates:
        raise FileNotFoundError(f"No {what} images under {root}; expected {layout}.")
    candidates.sort(key=lambda c: (c[0], c[1], str(c[2])))
    result = IndexResult(root=candidates[0][2].parent)
    find_masks = _montgomery_masks if source == "montgomery" else _shenzhen_masks
    masks = find_masks(root, [c[2] for c in candidates])
    seen: set[str] = set()
    for _, _, d in candidates:
        readings = [d.parent / "ClinicalReadings", d / "ClinicalReadings"]
        for f in _files(d):
            m = pattern.match(f.name)
            if _is_junk(f.name):
                result.skip("junk_file")
            elif m is None:
                result.skip("unrecognized_name" if _is_image(f.name) else "non_image_file")
            elif f.name.upper() in seen:
                result.skip("duplicate_copy")
            elif _empty(f):
                result.skip("empty_file")
            else:
                seen.add(f.name.upper())
                label = _map_label(result, mapping, m.group(2))
                if label is None:
                    continue
                if not any((r / (f.stem + ".txt")).is_file() for r in readings):
                    result.note("missing_clinical_reading")
                lung_masks = masks.get(f.name.upper(), "")
                if masks and not lung_masks:  # the mask set is there, this image's is not
                    result.note("no_lung_mask")
                result.records.append(
                    Record(_abs(f), source, m.group(2), label, patient_id=m.group(1),
                           lung_masks=lung_masks)
                )
    if not result.records and not result.skipped:
        raise FileNotFoundError(f"No {what} images under {root}; expected {layout}.")
    return result


def index_shenzhen(root: Path, label_map: Mapping[str, Any] | None = None) -> IndexResult:
    """Shenzhen (NLM China set): ``ChinaSet_AllFiles/CXR_png/CHNCXR_NNNN_{0,1}.png``."""
    return _index_nlm(root, label_map, "shenzhen")


def index_montgomery(root: Path, label_map: Mapping[str, Any] | None = None) -> IndexResult:
    """Montgomery County set: ``MontgomerySet/CXR_png/MCUCXR_NNNN_{0,1}.png``."""
    return _index_nlm(root, label_map, "montgomery")


# --------------------------------------------------------------------------- TBX11K

_TBX_CATEGORIES = ("health", "sick", "tb")
_TBX_LAYOUT = (
    "TBX11K/imgs/{health,sick,tb}/*.png with TBX11K/lists/TBX11K_train.txt and "
    "TBX11K_val.txt (pass TBX11K or its parent)"
)
_TBX_LISTS = (
    (("TBX11K_train.txt", "train"), ("TBX11K_val.txt", "val")),
    (("all_train.txt", "train"), ("all_val.txt", "val")),
)


def _tbx_find(root: Path) -> tuple[Path, Path] | None:
    """(dataset folder, imgs folder) of the shallowest TBX11K tree under root."""
    for d, _ in _walk_dirs(root, 3):
        if any((d / "imgs" / c).is_dir() for c in _TBX_CATEGORIES):
            return d, d / "imgs"
        if d.name == "imgs" and any((d / c).is_dir() for c in _TBX_CATEGORIES):
            return d.parent, d
    return None


def _tbx_read_lists(dataset: Path, result: IndexResult) -> dict[str, str] | None:
    """rel path (``tb/tb0003.png``) -> official split, or None when no list file exists."""
    lists_dir = dataset / "lists"
    for pair in _TBX_LISTS:
        present = [(lists_dir / n, split) for n, split in pair if (lists_dir / n).is_file()]
        if not present:
            continue
        listed: dict[str, str] = {}
        for path, split in present:
            log.info("tbx11k: using official list %s", path)
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                tokens = line.strip().split()
                if not tokens:
                    continue
                rel = tokens[0].replace("\\", "/").lstrip("./")
                rel = rel.removeprefix("imgs/")
                category = rel.split("/", 1)[0]
                if category not in _TBX_CATEGORIES:
                    # extra/ (other public sets) or test/ in an "all" list: not ours to use.
                    result.note(f"list_entry_ignored:{category}")
                elif rel in listed and listed[rel] != split:
                    result.note("list_entry_in_two_splits")
                else:
                    listed.setdefault(rel, split)
        return listed
    return None


def read_voc_boxes(path: Path) -> tuple[tuple[int, int, int, int], ...]:
    """The ``bndbox`` of every ``object`` in a Pascal VOC XML file, as inclusive pixel boxes
    ``(x0, y0, x1, y1)``: the coordinates (integers or decimals) are read as pixel edges,
    so a box covers columns ``floor(xmin)`` to ``ceil(xmax) - 1``, clipped to the image
    when its ``size`` is given. ValueError on a malformed file."""
    import math
    from xml.etree import ElementTree

    try:
        tree = ElementTree.parse(path)
    except ElementTree.ParseError as exc:
        raise ValueError(f"{path}: not XML ({exc})") from exc
    root = tree.getroot()
    width = root.findtext("size/width")
    height = root.findtext("size/height")
    boxes: list[tuple[int, int, int, int]] = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{path}: an object without bndbox")
        try:
            xmin, ymin, xmax, ymax = (float(bb.findtext(k) or "") for k in
                                      ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as exc:
            raise ValueError(f"{path}: bndbox coordinates are not numbers ({exc})") from exc
        x0, y0 = max(0, math.floor(xmin)), max(0, math.floor(ymin))
        x1, y1 = math.ceil(xmax) - 1, math.ceil(ymax) - 1
        if width and height:
            x1, y1 = min(x1, int(float(width)) - 1), min(y1, int(float(height)) - 1)
        if x1 < x0 or y1 < y0:
            raise ValueError(f"{path}: an empty box {xmin, ymin, xmax, ymax}")
        boxes.append((x0, y0, x1, y1))
    return tuple(boxes)


def _tbx_boxes(dataset: Path, result: IndexResult) -> dict[str, str]:
    """Image stem -> ``boxes`` JSON from ``annotations/xml/*.xml``; unreadable files are
    noted and left out."""
    out: dict[str, str] = {}
    for f in _files(dataset / "annotations" / "xml"):
        if _is_junk(f.name) or f.suffix.lower() != ".xml":
            continue
        try:
            boxes = read_voc_boxes(f)
        except ValueError as exc:
            log.warning("tbx11k: %s", exc)
            result.note("unreadable_box_annotation")
            continue
        if boxes:
            out[f.stem] = json.dumps([list(b) for b in boxes], separators=(",", ":"))
    return out


def _count_images(d: Path, result: IndexResult, reason: str) -> None:
    for f in _walk_files(d):
        if _is_junk(f.name):
            result.skip("junk_file")
        elif _is_image(f.name):
            result.skip(reason)


def index_tbx11k(root: Path, label_map: Mapping[str, Any] | None = None) -> IndexResult:
    """TBX11K: ``imgs/{health,sick,tb}``, restricted to the official train/val lists if present.

    ``official_split`` is the list's train/val assignment (empty in folder mode). The
    unlabeled ``imgs/test`` and ``imgs/extra`` (other public sets, including our external
    test sets) are skipped and counted. TB images get their ``boxes`` from
    ``annotations/xml/<stem>.xml`` when the folder is there.
    """
    root = _check_root(root, "TBX11K", _TBX_LAYOUT)
    found = _tbx_find(root)
    if found is None:
        raise FileNotFoundError(f"No TBX11K tree under {root}; expected {_TBX_LAYOUT}.")
    dataset, imgs = found
    mapping = _source_map(label_map, "tbx11k")
    result = IndexResult(root=dataset)
    listed = _tbx_read_lists(dataset, result)
    tb_boxes = _tbx_boxes(dataset, result)
    if listed is None:
        log.info("tbx11k: no list files under %s/lists, indexing the folders", dataset)
    on_disk: set[str] = set()
    for sub in _subdirs(imgs):
        category = sub.name
        if category not in _TBX_CATEGORIES:
            reason = {"test": "unlabeled_test", "extra": "extra_external_sets"}.get(
                category, f"unknown_folder:{category}"
            )
            _count_images(sub, result, reason)
            continue
        for f in _walk_files(sub):
            rel = f.relative_to(imgs).as_posix()
            if _is_junk(f.name):
                result.skip("junk_file")
                continue
            if not _is_image(f.name):
                result.skip("non_image_file")
                continue
            on_disk.add(rel)
            if listed is not None and rel not in listed:
                result.skip("not_in_official_lists")
            elif _empty(f):
                result.skip("empty_file")
            else:
                label = _map_label(result, mapping, category)
                if label is None:
                    continue
                official = listed.get(rel, "") if listed is not None else ""
                boxes = tb_boxes.get(f.stem, "") if category == "tb" else ""
                if category == "tb" and tb_boxes and not boxes:
                    result.note("tb_without_boxes")
                result.records.append(
                    Record(_abs(f), "tbx11k", category, label, "", boxes=boxes,
                           official_split=official)
                )
    if listed is not None:
        missing = len(set(listed) - on_disk)
        if missing:
            log.warning("tbx11k: %d images in the official lists are not on disk", missing)
        result.skip("listed_but_missing", missing)
    if not result.records and not result.skipped:
        raise FileNotFoundError(f"No TBX11K images under {imgs}; expected {_TBX_LAYOUT}.")
    return result


# --------------------------------------------------------------------------- Kermany

_KERMANY_SPLITS = ("train", "test", "val")
_KERMANY_LAYOUT = (
    "chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/*.jpeg (pass chest_xray or its parent)"
)
_PERSON_RE = re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+$", re.IGNORECASE)
_NORMAL_RE = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-\d+$", re.IGNORECASE)


def _kermany_patient(stem: str) -> str:
    """``person1000`` from ``person1000_virus_1681``; ``NORMAL2-IM-1427`` from its file."""
    m = _PERSON_RE.match(stem)
    if m:
        return m.group(1).lower()
    m = _NORMAL_RE.match(stem)
    if m:
        return m.group(1).upper()
    return ""


def _kermany_split_dirs(d: Path) -> list[Path]:
    """The train/test/val folders of d that hold class folders."""
    return [
        s
        for s in _subdirs(d)
        if s.name.lower() in _KERMANY_SPLITS
        and any(c.name.upper() in ("NORMAL", "PNEUMONIA") for c in _subdirs(s))
    ]


def index_kermany(root: Path, label_map: Mapping[str, Any] | None = None) -> IndexResult:
    """Kermany pediatric set: ``chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/*.jpeg``.

    Every copy of the tree under root (the Kaggle zip nests ``chest_xray/chest_xray``) is
    merged; an image already seen at the same ``split/CLASS/name`` is a ``duplicate_copy``.
    ``official_split`` is the set's train/test/val folder. Class folders other than
    NORMAL/PNEUMONIA go through the label map like any other label.
    """
    root = _check_root(root, "Kermany", _KERMANY_LAYOUT)
    copies = [d for d, _ in _walk_dirs(root, 4) if _kermany_split_dirs(d)]
    if not copies:
        raise FileNotFoundError(f"No Kermany tree under {root}; expected {_KERMANY_LAYOUT}.")
    mapping = _source_map(label_map, "kermany")
    result = IndexResult(root=copies[0])
    seen: set[tuple[str, str, str]] = set()
    for copy_root in copies:
        for split_dir in _kermany_split_dirs(copy_root):
            official = split_dir.name.lower()
            for f in split_dir.iterdir():
                if f.is_file():
                    result.skip("junk_file" if _is_junk(f.name) else "outside_class_folder")
            for class_dir in _subdirs(split_dir):
                source_label = class_dir.name.upper()
                for f in _walk_files(class_dir):
                    if _is_junk(f.name):
                        result.skip("junk_file")
                        continue
                    if not _is_image(f.name):
                        result.skip("non_image_file")
                        continue
                    key = (official, source_label, f.name)
                    if key in seen:
                        result.skip("duplicate_copy")
                        continue
                    seen.add(key)
                    if _empty(f):
                        result.skip("empty_file")
                        continue
                    label = _map_label(result, mapping, source_label)
                    if label is None:
                        continue
                    patient = _kermany_patient(f.stem)
                    if not patient:
                        result.note("no_patient_id")
                    result.records.append(
                        Record(_abs(f), "kermany", source_label, label, patient,
                               official_split=official)
                    )
    if not result.records and not result.skipped:
        raise FileNotFoundError(f"No Kermany images under {root}; expected {_KERMANY_LAYOUT}.")
    return result


# --------------------------------------------------------------------------- NIH TB portal

#: Column names tried, in order, after normalising (lower case, spaces/hyphens -> "_").
NIH_FILE_COLUMNS: tuple[str, ...] = (
    "image_name", "imagename", "file_name", "filename", "file", "image_file", "image",
    "image_path", "file_path", "filepath", "path", "dicom_file", "image_id",
)
NIH_PATIENT_COLUMNS: tuple[str, ...] = (
    "patient_id", "patientid", "patient", "subject_id", "condition_id", "case_id",
)
_NIH_LAYOUT = (
    "a folder of TB Portals images (png/jpg/dcm, any depth) and a metadata CSV with a file "
    f"column ({', '.join(NIH_FILE_COLUMNS[:4])}, ...) and a patient column "
    f"({', '.join(NIH_PATIENT_COLUMNS[:2])}, condition_id, ...)"
)


def _norm_col(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lstrip("\ufeff").lower())


def _pick_column(header: Sequence[str], wanted: str | None, defaults: Sequence[str]) -> str | None:
    """The header entry matching ``wanted`` (or the first default), compared normalised."""
    by_norm = {_norm_col(h): h for h in header}
    for cand in [wanted] if wanted else defaults:
        got = by_norm.get(_norm_col(cand))
        if got is not None:
            return got
    return None


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.DictReader(fh)
        rows = [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]
        return list(reader.fieldnames or []), rows


class _DiskIndex:
    """Images under a folder, looked up by relative path, then file name, then stem."""

    def __init__(self, root: Path, files: list[Path]) -> None:
        self.root = root
        self.by_rel: dict[str, Path] = {}
        self.by_name: dict[str, list[Path]] = {}
        self.by_stem: dict[str, list[Path]] = {}
        for f in files:
            self.by_rel[f.relative_to(root).as_posix().lower()] = f
            self.by_name.setdefault(f.name.lower(), []).append(f)
            self.by_stem.setdefault(f.stem.lower(), []).append(f)

    def find(self, value: str) -> tuple[Path | None, bool]:
        """(file, ambiguous)."""
        v = value.strip().replace("\\", "/")
        if not v:
            return None, False
        p = Path(v)
        if p.is_absolute():
            try:
                v = p.resolve().relative_to(self.root).as_posix()
            except ValueError:
                return (p, False) if p.is_file() else (None, False)
        v = v.lower().removeprefix("./")
        if v in self.by_rel:
            return self.by_rel[v], False
        name = v.rsplit("/", 1)[-1]
        for table, key in ((self.by_name, name), (self.by_stem, name)):
            hits = table.get(key, [])
            if len(hits) == 1:
                return hits[0], False
            if len(hits) > 1:
                return None, True
        if _is_image(name):  # the extension differs on disk, e.g. .png listed, .dcm stored
            hits = self.by_stem.get(os.path.splitext(name)[0], [])
            if len(hits) == 1:
                return hits[0], False
        return None, False


def index_nih_tb(
    root: Path,
    label_map: Mapping[str, Any] | None = None,
    csv_path: Path | None = None,
    file_column: str | None = None,
    patient_column: str | None = None,
) -> IndexResult:
    """NIH TB Portals images: every image under root named in the metadata CSV, label TB.

    ``csv_path`` defaults to the ``*.csv`` under root whose file column matches the most
    images. ``file_column`` / ``patient_column`` default to the first of
    ``NIH_FILE_COLUMNS`` / ``NIH_PATIENT_COLUMNS`` in the header. A CSV value may be a path
    relative to root, a file name, or a name without extension. Rows naming no file on
    disk (``listed_but_missing``) and images named by no row (``not_in_csv``) are counted
    in ``skipped`` and logged as warnings.
    """
    root = _check_root(root, "NIH TB", _NIH_LAYOUT)
    mapping = _source_map(label_map, "nih_tb")
    result = IndexResult(root=root)
    images: list[Path] = []
    csvs: list[Path] = []
    for f in _walk_files(root):
        if _is_junk(f.name):
            result.skip("junk_file")
        elif _is_image(f.name):
            images.append(f)
        elif f.suffix.lower() == ".csv":
            csvs.append(f)
    if not images:
        raise FileNotFoundError(f"No images under {root}; expected {_NIH_LAYOUT}.")
    disk = _DiskIndex(root, images)

    chosen: tuple[Path, list[str], list[dict[str, str]], str] | None = None
    if csv_path is not None:
        csv_path = Path(csv_path).expanduser()
        if not csv_path.is_file():
            raise FileNotFoundError(f"The NIH TB metadata CSV {csv_path} does not exist.")
        header, rows = _read_csv(csv_path)
        col = _pick_column(header, file_column, NIH_FILE_COLUMNS)
        if col is None:
            raise ValueError(
                f"The NIH TB metadata CSV {csv_path} has no file column "
                f"({file_column or ' / '.join(NIH_FILE_COLUMNS)}); its columns are "
                f"{', '.join(header)}. Pass file_column."
            )
        chosen = (csv_path, header, rows, col)
    else:
        best = -1
        for cand in csvs:
            header, rows = _read_csv(cand)
            col = _pick_column(header, file_column, NIH_FILE_COLUMNS)
            if col is None:
                continue
            hits = sum(1 for r in rows if disk.find(r.get(col, ""))[0] is not None)
            if hits > best:
                best, chosen = hits, (cand, header, rows, col)
        if chosen is None:
            raise FileNotFoundError(
                f"No NIH TB metadata CSV with a file column under {root}; expected "
                f"{_NIH_LAYOUT}. Pass csv_path (and file_column) to name it."
            )
    csv_file, header, rows, fcol = chosen
    pcol = _pick_column(header, patient_column, NIH_PATIENT_COLUMNS)
    if patient_column and pcol is None:
        raise ValueError(
            f"The NIH TB metadata CSV {csv_file} has no column {patient_column!r}; its columns "
            f"are {', '.join(header)}."
        )
    if pcol is None:
        log.warning("nih_tb: %s has no patient column; each image is its own patient", csv_file)
    log.info("nih_tb: metadata %s, file column %r, patient column %r", csv_file, fcol, pcol)

    used: dict[Path, str] = {}
    missing = 0
    for row in rows:
        value = row.get(fcol, "")
        if not value.strip():
            result.note("csv_row_without_file")
            continue
        hit, ambiguous = disk.find(value)
        if hit is None:
            if ambiguous:
                result.skip("ambiguous_file_name")
            else:
                missing += 1
            continue
        patient = row.get(pcol, "").strip() if pcol else ""
        if hit in used:
            result.note("duplicate_csv_row" if used[hit] == patient else "conflicting_patient_id")
            continue
        used[hit] = patient
    result.skip("listed_but_missing", missing)
    not_in_csv = sum(1 for f in images if f not in used)
    result.skip("not_in_csv", not_in_csv)
    if missing:
        log.warning("nih_tb: %d rows of %s name no image on disk", missing, csv_file)
    if not_in_csv:
        log.warning("nih_tb: %d images under %s are not in %s", not_in_csv, root, csv_file)
    for f, patient in sorted(used.items()):
        if _empty(f):
            result.skip("empty_file")
            continue
        label = _map_label(result, mapping, "TB")
        if label is None:
            continue
        if not patient:
            result.note("no_patient_id")
        result.records.append(Record(_abs(f), "nih_tb", "TB", label, patient))
    return result


# --------------------------------------------------------------------------- phantom

_PHANTOM_LAYOUT = "a folder with ground_truth.csv (path,label,boxes,...,study_instance_uid,...)"


def index_phantom(root: Path, label_map: Mapping[str, Any] | None = None) -> IndexResult:
    """Our synthetic set: ``ground_truth.csv`` (at root or up to two levels below)."""
    root = _check_root(root, "phantom", _PHANTOM_LAYOUT)
    gts: list[Path] = []
    for d, depth in _walk_dirs(root, 2):
        if gts and depth > 0 and all(d.is_relative_to(g.parent) for g in gts):
            continue
        if (d / "ground_truth.csv").is_file():
            gts.append(d / "ground_truth.csv")
    if not gts:
        raise FileNotFoundError(f"No ground_truth.csv under {root}; expected {_PHANTOM_LAYOUT}.")
    mapping = _source_map(label_map, "phantom")
    result = IndexResult(root=gts[0].parent)
    seen: set[str] = set()
    for gt in gts:
        header, rows = _read_csv(gt)
        lacking = [c for c in ("path", "label") if c not in header]
        if lacking:
            raise ValueError(f"{gt} lacks the column(s) {', '.join(lacking)}.")
        for row in rows:
            p = Path(row["path"].strip())
            f = p if p.is_absolute() else gt.parent / p
            if not row["path"].strip() or not f.is_file():
                result.skip("missing_file")
                continue
            path = _abs(f)
            if path in seen:
                result.skip("duplicate_row")
                continue
            seen.add(path)
            label = _map_label(result, mapping, row["label"].strip())
            if label is None:
                continue
            boxes = row.get("boxes", "").strip()
            if boxes:
                try:
                    ok = isinstance(json.loads(boxes), list)
                except json.JSONDecodeError:
                    ok = False
                if not ok:
                    result.note("invalid_boxes")
                    boxes = ""
            patient = row.get("study_instance_uid", "").strip()
            if not patient:
                result.note("no_patient_id")
            sides = [(row.get(c) or "").strip() for c in ("left_mask", "right_mask")]
            masks = ""
            if all(sides):
                left, right = (gt.parent / s for s in sides)
                if left.is_file() and right.is_file():
                    masks = sides_spec(_abs(left), _abs(right))
                else:
                    result.note("missing_lung_mask")
            result.records.append(
                Record(path, "phantom", row["label"].strip(), label, patient, boxes=boxes,
                       lung_masks=masks)
            )
    return result


IndexFn = Callable[..., IndexResult]
INDEXERS: dict[str, IndexFn] = {
    "nih_tb": index_nih_tb,
    "tbx11k": index_tbx11k,
    "kermany": index_kermany,
    "shenzhen": index_shenzhen,
    "montgomery": index_montgomery,
    "phantom": index_phantom,
}


# --------------------------------------------------------------------------- splits


def _sort_key(r: Record) -> tuple[str, ...]:
    return (r.source, r.path, r.patient_id, r.label, r.source_label, r.boxes, r.official_split)


def _majority(records: Sequence[Record]) -> str:
    counts = Counter(r.label for r in records)
    order = {lab: i for i, lab in enumerate(LABELS)}
    return min(counts, key=lambda lab: (-counts[lab], order.get(lab, len(order)), lab))


def assign_splits(
    records: Iterable[Record],
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    test_sources: Sequence[str] = DEFAULT_TEST_SOURCES,
) -> list[Record]:
    """Records with ``split`` set, sorted by (source, path).

    Records of ``test_sources`` get "test". The rest are grouped by (source, patient_id)
    (a record without a patient id is its own group), each group takes its records'
    majority label, and within each (source, class) stratum groups are shuffled with a
    seeded RNG and moved to "val" while that brings the stratum's val image count closer to
    ``val_fraction`` of its images; the others are "train". The result depends only on the
    set of records, ``val_fraction`` and ``seed``, not on their order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}.")
    ordered = sorted(records, key=_sort_key)
    tests = set(test_sources)
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in ordered:
        if r.source not in tests:
            key = (r.source, f"patient:{r.patient_id}" if r.patient_id else f"path:{r.path}")
            groups.setdefault(key, []).append(r)
    strata: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for key, members in groups.items():
        strata.setdefault((key[0], _majority(members)), []).append(key)
    val_groups: set[tuple[str, str]] = set()
    for (source, cls), keys in sorted(strata.items()):
        keys = sorted(keys)
        random.Random(f"cxrd-split:{seed}:{source}:{cls}").shuffle(keys)
        target = val_fraction * sum(len(groups[k]) for k in keys)
        n_val = 0
        for k in keys:
            size = len(groups[k])
            if abs(n_val + size - target) < abs(n_val - target):
                val_groups.add(k)
                n_val += size
    out: list[Record] = []
    for r in ordered:
        if r.source in tests:
            split = "test"
        else:
            key = (r.source, f"patient:{r.patient_id}" if r.patient_id else f"path:{r.path}")
            split = "val" if key in val_groups else "train"
        out.append(replace(r, split=split))
    return out


# --------------------------------------------------------------------------- manifest I/O


def write_manifest(records: Iterable[Record], path: Path) -> None:
    """Write records as CSV (header ``MANIFEST_COLUMNS``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        for r in records:
            writer.writerow([getattr(r, c) for c in MANIFEST_COLUMNS])
    os.replace(tmp, path)


def read_manifest(path: Path) -> list[Record]:
    """Records from a manifest written by ``write_manifest``."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        lacking = [c for c in _REQUIRED_COLUMNS if c not in header]
        if lacking:
            raise ValueError(f"The manifest {path} lacks the column(s) {', '.join(lacking)}.")
        out: list[Record] = []
        for line, row in enumerate(reader, start=2):
            values = {c: (row.get(c) or "") for c in MANIFEST_COLUMNS}
            if values["label"] not in LABELS:
                raise ValueError(
                    f"{path} line {line}: label {values['label']!r} is not TB, NTB or NORM."
                )
            if values["split"] not in ("", *SPLITS):
                raise ValueError(
                    f"{path} line {line}: split {values['split']!r} is not train, val or test."
                )
            out.append(Record(**values))
    return out


def summarize(records: Iterable[Record]) -> dict[str, Any]:
    """Counts: total, by split x label, and by source x label x split ("" split: "none")."""
    by_source: dict[str, dict[str, dict[str, int]]] = {}
    by_split: dict[str, dict[str, int]] = {}
    total = 0
    for r in records:
        split = r.split or "none"
        cell = by_source.setdefault(r.source, {}).setdefault(r.label, {})
        cell[split] = cell.get(split, 0) + 1
        row = by_split.setdefault(split, {})
        row[r.label] = row.get(r.label, 0) + 1
        total += 1

    def _sorted(d: dict[str, Any]) -> dict[str, Any]:
        return {k: _sorted(v) if isinstance(v, dict) else v for k, v in sorted(d.items())}

    return {"total": total, "by_split": _sorted(by_split), "by_source": _sorted(by_source)}


def format_summary(summary: Mapping[str, Any]) -> str:
    """A plain-text table of ``summarize`` output: one line per source x label."""
    splits = sorted({s for labs in summary["by_source"].values() for c in labs.values() for s in c})
    lines = [f"{'source':<12}{'label':<6}" + "".join(f"{s:>8}" for s in splits)]
    for source, labs in summary["by_source"].items():
        for lab, cell in labs.items():
            lines.append(f"{source:<12}{lab:<6}" + "".join(f"{cell.get(s, 0):>8}" for s in splits))
    lines.append(f"total {summary['total']}")
    return "\n".join(lines)


def summary_path(out: Path) -> Path:
    """Where ``build_manifest`` writes its summary: ``runs/m.csv`` -> ``runs/m.summary.json``."""
    out = Path(out)
    return out.with_suffix(".summary.json")


def build_manifest(
    sources: Mapping[str, Path],
    out: Path,
    *,
    label_map: Mapping[str, Mapping[str, str]] | Path | None = None,
    val_fraction: float = 0.15,
    seed: int = 0,
    nih_csv: Path | None = None,
    nih_file_column: str | None = None,
    nih_patient_column: str | None = None,
    progress: bool = False,
    test_sources: Sequence[str] = DEFAULT_TEST_SOURCES,
) -> list[Record]:
    """Index ``sources`` (key -> folder), assign splits, write the manifest and its summary.

    ``label_map`` is a full map (source -> {source label: target}; a source it names gets
    exactly that mapping, the others keep the default, as ``load_label_map`` returns), a
    JSON file for ``load_label_map``, or None for the default. The summary JSON
    (``summary_path(out)``) holds the counts, the skipped and noted reasons per source and
    the label map used. ``nih_csv`` / ``nih_file_column`` / ``nih_patient_column`` go to
    ``index_nih_tb``. Nothing is printed; ``progress`` shows a tqdm bar on stderr.
    """
    unknown = sorted(set(sources) - set(INDEXERS))
    if unknown:
        raise ValueError(
            f"Unknown source(s) {', '.join(unknown)}; known sources are {', '.join(INDEXERS)}."
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}.")
    if isinstance(label_map, (str, Path)):
        full_map = load_label_map(Path(label_map))
    else:
        full_map = copy.deepcopy(LABEL_MAP_DEFAULT)
        if label_map is not None:
            validate_label_map(label_map)
            for key, mapping in label_map.items():
                full_map[key] = dict(mapping)
    keys: Iterable[str] = list(sources)
    if progress:
        from tqdm import tqdm

        keys = tqdm(list(keys), desc="indexing", unit="source")
    records: list[Record] = []
    per_source: dict[str, Any] = {}
    for key in keys:
        root = Path(sources[key])
        if key == "nih_tb":
            result = index_nih_tb(root, full_map, csv_path=nih_csv, file_column=nih_file_column,
                                  patient_column=nih_patient_column)
        else:
            result = INDEXERS[key](root, full_map)
        log.info("%s: %d records from %s, skipped %s", key, len(result.records), result.root,
                 result.skipped)
        records.extend(result.records)
        per_source[key] = {
            "root": str(result.root or root),
            "records": len(result.records),
            "skipped": dict(sorted(result.skipped.items())),
            "notes": dict(sorted(result.notes.items())),
        }
    records = assign_splits(records, val_fraction=val_fraction, seed=seed,
                            test_sources=test_sources)
    out = Path(out)
    write_manifest(records, out)
    summary = {
        "manifest": str(out.resolve()),
        "seed": seed,
        "val_fraction": val_fraction,
        "test_sources": list(test_sources),
        "counts": summarize(records),
        "sources": per_source,
        "label_map": {k: full_map[k] for k in sorted(full_map)},
    }
    summary_path(out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return records
