"""training.sources: indexers on fake trees with each set's real naming, splits, manifest."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import sources
from training.masks import read_lung_masks
from training.sources import Record

# --------------------------------------------------------------------------- helpers


def _img(path: Path) -> Path:
    """A tiny valid image, PNG or JPEG by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.new("L", (8, 8), 128).save(path, format=fmt)
    return path


def _text(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _by_name(records: list[Record]) -> dict[str, Record]:
    return {Path(r.path).name: r for r in records}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def shenzhen_tree(tmp_path: Path) -> Path:
    """``downloads/ChinaSet_AllFiles/{CXR_png,ClinicalReadings}`` plus debris."""
    root = tmp_path / "downloads" / "ChinaSet_AllFiles"
    names = ["CHNCXR_0001_0", "CHNCXR_0002_0", "CHNCXR_0327_1", "CHNCXR_0328_1", "CHNCXR_0662_1"]
    for n in names:
        _img(root / "CXR_png" / f"{n}.png")
    for n in names[:-1]:  # one reading missing
        _text(root / "ClinicalReadings" / f"{n}.txt", "male 35yrs\nnormal\n")
    _text(root / "CXR_png" / "Thumbs.db")
    _text(root / "NLM-ChinaCXRSet-ReadMe.docx")
    _text(tmp_path / "downloads" / "__MACOSX" / "ChinaSet_AllFiles" / "CXR_png" /
          "._CHNCXR_0001_0.png")
    return root


@pytest.fixture
def montgomery_tree(tmp_path: Path) -> Path:
    """``MontgomerySet/{CXR_png,ClinicalReadings,ManualMask/{left,right}Mask}``."""
    root = tmp_path / "NLM" / "MontgomerySet"
    names = ["MCUCXR_0001_0", "MCUCXR_0002_0", "MCUCXR_0104_1"]
    for n in names:
        _img(root / "CXR_png" / f"{n}.png")
        _text(root / "ClinicalReadings" / f"{n}.txt", "Patient's Sex: M\nPatient's Age: 040Y\n")
        _img(root / "ManualMask" / "leftMask" / f"{n}.png")
        _img(root / "ManualMask" / "rightMask" / f"{n}.png")
    _text(root / "CXR_png" / ".DS_Store")
    _text(root / "NLM-MontgomeryCXRSet-ReadMe.pdf")
    return root


@pytest.fixture
def tbx11k_tree(tmp_path: Path) -> Path:
    """``TBX11K/{imgs/{health,sick,tb,test,extra},lists,annotations/{json,xml}}``."""
    root = tmp_path / "TBX11K"
    imgs = root / "imgs"
    for rel in ["health/h0001.png", "health/h0002.png", "health/h0003.png",
                "sick/s0001.png", "sick/s0002.png",
                "tb/tb0003.png", "tb/tb0004.png", "tb/tb0005.png",
                "test/t0001.png", "test/t0002.png",
                "extra/shenzhen/CHNCXR_0001_0.png", "extra/da/tb/da0001.png"]:
        _img(imgs / rel)
    _text(imgs / "tb" / "Thumbs.db")
    lists = root / "lists"
    _text(lists / "TBX11K_train.txt", "health/h0001.png\nsick/s0001.png\ntb/tb0003.png\n"
          "tb/tb0005.png\n")
    _text(lists / "TBX11K_val.txt", "health/h0002.png\nsick/s0002.png\ntb/tb0004.png\n"
          "tb/tb0999.png\n")  # tb0999 is not on disk; h0003 is on disk but in no list
    _text(lists / "all_train.txt", "health/h0001.png\nextra/da/tb/da0001.png\n")
    _text(lists / "all_trainval_test.txt", "health/h0001.png\ntest/t0001.png\n")
    _text(root / "annotations" / "json" / "TBX11K_train.json", json.dumps({"images": []}))
    _text(root / "annotations" / "xml" / "tb0003.xml", "<annotation/>")
    return root


KERMANY_FILES = {
    "train/NORMAL": ["IM-0115-0001.jpeg", "IM-0115-0002.jpeg", "NORMAL2-IM-1427-0001.jpeg"],
    "train/PNEUMONIA": ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg",
                        "person1000_virus_1681.jpeg"],
    "test/NORMAL": ["IM-0001-0001.jpeg"],
    "test/PNEUMONIA": ["person100_bacteria_475.jpeg"],
    "val/NORMAL": ["NORMAL2-IM-1440-0001.jpeg"],
    "val/PNEUMONIA": ["person1946_bacteria_4874.jpeg"],
}


@pytest.fixture
def kermany_tree(tmp_path: Path) -> Path:
    """The Kaggle zip: ``chest_xray/{train,test,val}``, a nested duplicate, ``__MACOSX``."""
    top = tmp_path / "archive"
    outer = top / "chest_xray"
    for sub, names in KERMANY_FILES.items():
        for n in names:
            _img(outer / sub / n)
            _img(outer / "chest_xray" / sub / n)  # the nested duplicate copy
            _text(top / "__MACOSX" / "chest_xray" / sub / f"._{n}")
        _text(outer / sub / ".DS_Store")
    _img(outer / "chest_xray" / "train" / "PNEUMONIA" / "person2_virus_3.jpeg")  # only nested
    _text(outer / ".DS_Store")
    return top


@pytest.fixture
def nih_tree(tmp_path: Path) -> Path:
    """TB Portals-like: images at two depths, one DICOM, a metadata CSV."""
    root = tmp_path / "nih-tb"
    _img(root / "images" / "a1.png")
    _img(root / "images" / "a2.png")
    _img(root / "images" / "sub" / "b1.jpg")
    _text(root / "images" / "c1.dcm", "DICM")  # not read by the indexer
    _img(root / "images" / "stray.png")  # not in the CSV
    _text(root / "images" / "Thumbs.db")
    _text(root / "metadata" / "TB_Portals_CXR_metadata.csv",
          "condition_id,patient_id,image_name,type_of_resistance\n"
          "c-10,p-1,a1.png,Sensitive\n"
          "c-11,p-1,a2.png,Sensitive\n"
          "c-20,p-2,b1.jpg,MDR\n"
          "c-30,p-3,c1.dcm,XDR\n"
          "c-40,p-4,gone.png,MDR\n")  # gone.png missing on disk
    _text(root / "metadata" / "notes.csv", "a,b\n1,2\n")  # no file column: ignored
    return root


@pytest.fixture
def phantom_tree(tmp_path: Path) -> Path:
    root = tmp_path / "phantoms"
    _img(root / "images" / "0000.png")
    _img(root / "images" / "0001.png")
    _img(root / "images" / "0002.png")
    header = ("path,label,boxes,rows,cols,view,body_part,study_instance_uid,"
              "sop_instance_uid\n")
    rows = [
        'images/0000.png,TB,"[[10, 20, 30, 40]]",8,8,PA,CHEST,1.2.3.1,1.2.3.1.1\n',
        "images/0001.png,NTB,[],8,8,PA,CHEST,1.2.3.2,1.2.3.2.1\n",
        "images/0002.png,NORM,,8,8,AP,CHEST,1.2.3.2,1.2.3.2.2\n",
        "images/0003.png,NORM,,8,8,AP,CHEST,1.2.3.3,1.2.3.3.1\n",  # missing on disk
    ]
    _text(root / "ground_truth.csv", header + "".join(rows))
    return root


# --------------------------------------------------------------------------- indexers


@pytest.mark.parametrize("level", ["dataset", "parent"])
def test_shenzhen(shenzhen_tree: Path, level: str) -> None:
    root = shenzhen_tree if level == "dataset" else shenzhen_tree.parent
    res = sources.index_shenzhen(root, sources.LABEL_MAP_DEFAULT)
    recs = _by_name(res.records)
    assert sorted(recs) == ["CHNCXR_0001_0.png", "CHNCXR_0002_0.png", "CHNCXR_0327_1.png",
                            "CHNCXR_0328_1.png", "CHNCXR_0662_1.png"]
    assert recs["CHNCXR_0001_0.png"].label == "NORM"
    assert recs["CHNCXR_0001_0.png"].source_label == "0"
    assert recs["CHNCXR_0327_1.png"].label == "TB"
    assert recs["CHNCXR_0327_1.png"].patient_id == "0327"
    assert all(r.source == "shenzhen" and Path(r.path).is_absolute() for r in res.records)
    assert res.skipped == {"junk_file": 1}
    assert res.notes == {"missing_clinical_reading": 1}
    assert res.root == shenzhen_tree.resolve()


def _lung_png(path: Path, cols: tuple[int, int], size: tuple[int, int] = (40, 50)) -> Path:
    """A mask (rows, cols = size) with one lung-like block over the given columns."""
    arr = np.zeros(size, dtype=np.uint8)
    arr[8:32, cols[0]:cols[1]] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def test_montgomery_images_and_lung_masks(montgomery_tree: Path) -> None:
    # MCUCXR_0001_0's masks hold lungs: leftMask on the image's right, as a frontal shows it
    for side, cols in (("leftMask", (30, 45)), ("rightMask", (5, 20))):
        _lung_png(montgomery_tree / "ManualMask" / side / "MCUCXR_0001_0.png", cols)
    (montgomery_tree / "ManualMask" / "rightMask" / "MCUCXR_0104_1.png").unlink()
    res = sources.index_montgomery(montgomery_tree.parent)
    assert len(res.records) == 3
    assert all(Path(r.path).parent.name == "CXR_png" for r in res.records)
    labels = {Path(r.path).stem: (r.label, r.patient_id) for r in res.records}
    assert labels == {"MCUCXR_0001_0": ("NORM", "0001"), "MCUCXR_0002_0": ("NORM", "0002"),
                      "MCUCXR_0104_1": ("TB", "0104")}
    assert res.skipped == {"junk_file": 1}
    assert res.notes == {"no_lung_mask": 1}  # MCUCXR_0104_1 lacks its right mask
    recs = {Path(r.path).stem: r for r in res.records}
    assert recs["MCUCXR_0104_1"].lung_masks == ""
    spec = json.loads(recs["MCUCXR_0001_0"].lung_masks)
    assert [Path(p).parent.name for p in spec["lungs"]] == ["leftMask", "rightMask"]
    left, right = read_lung_masks(recs["MCUCXR_0001_0"].lung_masks)
    assert left[:, 30:45].all(axis=1).sum() == 24 and not left[:, :25].any()
    assert right[:, 5:20].all(axis=1).sum() == 24 and not right[:, 25:].any()


def test_shenzhen_lung_mask_release(shenzhen_tree: Path) -> None:
    masks = shenzhen_tree.parent / "shenzhen-lung-masks" / "mask"
    for n in ("CHNCXR_0001_0", "CHNCXR_0327_1", "CHNCXR_0999_1"):  # 0999: no such image
        img = np.zeros((40, 50), dtype=np.uint8)
        img[8:32, 5:20] = img[8:32, 30:45] = 255  # both lungs in one file
        masks.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(masks / f"{n}_mask.png")
    res = sources.index_shenzhen(shenzhen_tree.parent, sources.LABEL_MAP_DEFAULT)
    recs = _by_name(res.records)
    assert len(recs) == 5  # the mask folder holds no images
    assert res.notes == {"missing_clinical_reading": 1, "no_lung_mask": 3}
    with_masks = sorted(n for n, r in recs.items() if r.lung_masks)
    assert with_masks == ["CHNCXR_0001_0.png", "CHNCXR_0327_1.png"]
    left, right = read_lung_masks(recs["CHNCXR_0327_1.png"].lung_masks)
    assert left[8:32, 30:45].all() and not left[:, :25].any()
    assert right[8:32, 5:20].all() and not right[:, 25:].any()
    # given the image folder's own parent only, the release is not found: no masks, no note
    res = sources.index_shenzhen(shenzhen_tree)
    assert not any(r.lung_masks for r in res.records) and "no_lung_mask" not in res.notes


_VOC = """<annotation>
  <folder>tb</folder><filename>{name}.png</filename>
  <size><width>512</width><height>512</height><depth>3</depth></size>
  {objects}
</annotation>"""
_VOC_OBJECT = """<object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated>
  <difficult>0</difficult><bndbox><xmin>{0}</xmin><ymin>{1}</ymin><xmax>{2}</xmax>
  <ymax>{3}</ymax></bndbox></object>"""


def test_tbx11k_tb_boxes_from_voc_xml(tbx11k_tree: Path) -> None:
    xml = tbx11k_tree / "annotations" / "xml"
    objects = [_VOC_OBJECT.format(100.4, 50, 180.6, 120, cls="ActiveTuberculosis"),
               _VOC_OBJECT.format(300, 60, 520, 140, cls="ObsoletePulmonaryTuberculosis")]
    _text(xml / "tb0003.xml", _VOC.format(name="tb0003", objects="".join(objects)))
    _text(xml / "tb0004.xml", "<annotation><object><name>x</name></object></annotation>")
    res = sources.index_tbx11k(tbx11k_tree, sources.LABEL_MAP_DEFAULT)
    recs = _by_name(res.records)
    # pixel edges to inclusive pixels, clipped to the 512-pixel image
    assert json.loads(recs["tb0003.png"].boxes) == [[100, 50, 180, 119], [300, 60, 511, 139]]
    assert recs["tb0004.png"].boxes == recs["tb0005.png"].boxes == ""
    assert all(r.boxes == "" for r in res.records if r.source_label != "tb")
    assert res.notes == {"unreadable_box_annotation": 1, "tb_without_boxes": 2}
    assert sources.read_voc_boxes(xml / "tb0003.xml")[0] == (100, 50, 180, 119)
    with pytest.raises(ValueError, match="bndbox"):
        sources.read_voc_boxes(xml / "tb0004.xml")


def test_tbx11k_with_official_lists(tbx11k_tree: Path) -> None:
    for root in (tbx11k_tree, tbx11k_tree.parent):
        res = sources.index_tbx11k(root, sources.LABEL_MAP_DEFAULT)
        recs = _by_name(res.records)
        assert sorted(recs) == ["h0001.png", "h0002.png", "s0001.png", "s0002.png",
                                "tb0003.png", "tb0004.png", "tb0005.png"]
        assert {n: r.label for n, r in recs.items()} == {
            "h0001.png": "NORM", "h0002.png": "NORM", "s0001.png": "NTB", "s0002.png": "NTB",
            "tb0003.png": "TB", "tb0004.png": "TB", "tb0005.png": "TB"}
        assert recs["tb0003.png"].official_split == "train"
        assert recs["tb0004.png"].official_split == "val"
        assert recs["s0001.png"].source_label == "sick"
        assert all(r.patient_id == "" for r in res.records)
        assert res.skipped == {
            "unlabeled_test": 2,
            "extra_external_sets": 2,
            "not_in_official_lists": 1,
            "listed_but_missing": 1,
            "junk_file": 1,
        }


def test_tbx11k_folder_mode_without_lists(tbx11k_tree: Path) -> None:
    for f in (tbx11k_tree / "lists").iterdir():
        f.unlink()
    res = sources.index_tbx11k(tbx11k_tree)
    assert len(res.records) == 8
    assert all(r.official_split == "" for r in res.records)
    assert "not_in_official_lists" not in res.skipped
    assert res.skipped["unlabeled_test"] == 2


def test_tbx11k_falls_back_to_all_lists(tbx11k_tree: Path) -> None:
    (tbx11k_tree / "lists" / "TBX11K_train.txt").unlink()
    (tbx11k_tree / "lists" / "TBX11K_val.txt").unlink()
    res = sources.index_tbx11k(tbx11k_tree)
    assert [Path(r.path).name for r in res.records] == ["h0001.png"]
    assert res.notes == {"list_entry_ignored:extra": 1}


def test_kermany_kaggle_zip(kermany_tree: Path) -> None:
    res = sources.index_kermany(kermany_tree)
    recs = _by_name(res.records)
    n_unique = sum(len(v) for v in KERMANY_FILES.values())
    assert len(res.records) == n_unique + 1  # plus the file only in the nested copy
    assert res.skipped == {"duplicate_copy": n_unique, "junk_file": len(KERMANY_FILES)}
    assert recs["person1000_virus_1681.jpeg"].patient_id == "person1000"
    assert recs["person1_bacteria_2.jpeg"].patient_id == "person1"
    assert recs["person1_bacteria_2.jpeg"].label == "NTB"
    assert recs["person1_bacteria_2.jpeg"].source_label == "PNEUMONIA"
    assert recs["IM-0115-0002.jpeg"].patient_id == "IM-0115"
    assert recs["IM-0115-0002.jpeg"].label == "NORM"
    assert recs["NORMAL2-IM-1427-0001.jpeg"].patient_id == "NORMAL2-IM-1427"
    assert recs["IM-0001-0001.jpeg"].official_split == "test"
    assert recs["NORMAL2-IM-1440-0001.jpeg"].official_split == "val"
    assert recs["person2_virus_3.jpeg"].official_split == "train"
    assert not any("__MACOSX" in r.path for r in res.records)
    assert Counter(r.label for r in res.records) == {"NTB": 6, "NORM": 5}


def test_kermany_plain_mendeley_tree(tmp_path: Path) -> None:
    root = tmp_path / "ZhangLabData" / "CellData" / "chest_xray"
    _img(root / "train" / "NORMAL" / "IM-0115-0001.jpeg")
    _img(root / "test" / "PNEUMONIA" / "person1_virus_6.jpeg")
    _img(root / "test" / "PNEUMONIA" / "oddname.jpeg")
    res = sources.index_kermany(tmp_path / "ZhangLabData")
    assert len(res.records) == 3
    assert res.notes == {"no_patient_id": 1}
    assert res.skipped == {}


def test_nih_tb_autodetect(nih_tree: Path) -> None:
    res = sources.index_nih_tb(nih_tree, sources.LABEL_MAP_DEFAULT)
    recs = _by_name(res.records)
    assert sorted(recs) == ["a1.png", "a2.png", "b1.jpg", "c1.dcm"]
    assert {n: r.patient_id for n, r in recs.items()} == {
        "a1.png": "p-1", "a2.png": "p-1", "b1.jpg": "p-2", "c1.dcm": "p-3"}
    assert all(r.label == "TB" and r.source_label == "TB" for r in res.records)
    assert res.skipped == {"listed_but_missing": 1, "not_in_csv": 1, "junk_file": 1}


def test_nih_tb_explicit_columns_and_stems(nih_tree: Path, tmp_path: Path) -> None:
    meta = _text(tmp_path / "elsewhere.csv",
                 "Condition ID,File\nc-1,a1\nc-1,images/a2.png\nc-2,sub/b1\nc-2,b1.jpg\n")
    res = sources.index_nih_tb(nih_tree, csv_path=meta, file_column="file",
                               patient_column="condition_id")
    assert {Path(r.path).name: r.patient_id for r in res.records} == {
        "a1.png": "c-1", "a2.png": "c-1", "b1.jpg": "c-2"}
    assert res.skipped == {"not_in_csv": 2, "junk_file": 1}
    assert res.notes == {"duplicate_csv_row": 1}


def test_nih_tb_errors(nih_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no column 'nope'"):
        sources.index_nih_tb(nih_tree, patient_column="nope")
    (nih_tree / "metadata" / "TB_Portals_CXR_metadata.csv").unlink()
    with pytest.raises(FileNotFoundError, match="csv_path"):
        sources.index_nih_tb(nih_tree)
    with pytest.raises(FileNotFoundError, match="No images"):
        sources.index_nih_tb(_text(tmp_path / "empty" / "m.csv", "image_name\n").parent)


def test_phantom(phantom_tree: Path) -> None:
    res = sources.index_phantom(phantom_tree.parent)
    recs = _by_name(res.records)
    assert {n: (r.label, r.patient_id) for n, r in recs.items()} == {
        "0000.png": ("TB", "1.2.3.1"), "0001.png": ("NTB", "1.2.3.2"),
        "0002.png": ("NORM", "1.2.3.2")}
    assert json.loads(recs["0000.png"].boxes) == [[10, 20, 30, 40]]
    assert recs["0002.png"].boxes == ""
    assert res.skipped == {"missing_file": 1}


@pytest.mark.parametrize("indexer", sorted(sources.INDEXERS))
def test_missing_or_empty_tree_names_the_layout(indexer: str, tmp_path: Path) -> None:
    fn = sources.INDEXERS[indexer]
    with pytest.raises(FileNotFoundError, match="expected"):
        fn(tmp_path / "does-not-exist", None)
    _text(tmp_path / "empty" / "readme.txt")
    with pytest.raises(FileNotFoundError, match="expected"):
        fn(tmp_path / "empty", None)


def test_indexers_cover_all_sources() -> None:
    assert set(sources.INDEXERS) == set(sources.LABEL_MAP_DEFAULT) == set(sources.SOURCES)


# --------------------------------------------------------------------------- label maps


def test_label_map_override_drops(tmp_path: Path, kermany_tree: Path) -> None:
    path = _text(tmp_path / "map.json", json.dumps({"kermany": {"PNEUMONIA": ""}}))
    label_map = sources.load_label_map(path)
    assert label_map["kermany"] == {"PNEUMONIA": "", "NORMAL": "NORM"}
    assert label_map["tbx11k"] == sources.LABEL_MAP_DEFAULT["tbx11k"]
    assert sources.LABEL_MAP_DEFAULT["kermany"]["PNEUMONIA"] == "NTB"  # default untouched
    res = sources.index_kermany(kermany_tree, label_map)
    assert {r.label for r in res.records} == {"NORM"}
    assert res.skipped["dropped_by_label_map:PNEUMONIA"] == 6


def test_label_map_per_source_mapping_and_unmapped(tbx11k_tree: Path) -> None:
    res = sources.index_tbx11k(tbx11k_tree, {"tb": "TB", "health": "NORM"})
    assert {r.source_label for r in res.records} == {"tb", "health"}
    assert res.skipped["unmapped_label:sick"] == 2


def test_load_label_map_default() -> None:
    assert sources.load_label_map(None) == sources.LABEL_MAP_DEFAULT


@pytest.mark.parametrize("content, message", [
    ({"chexpert": {"x": "TB"}}, "Unknown source 'chexpert'"),
    ({"kermany": {"PNEUMONIA": "pneumonia"}}, "not one of TB, NTB, NORM"),
    ({"kermany": "NTB"}, "must be an object"),
    ([1, 2], "must be a JSON object"),
])
def test_load_label_map_invalid(tmp_path: Path, content: object, message: str) -> None:
    path = _text(tmp_path / "map.json", json.dumps(content))
    with pytest.raises(ValueError, match=message):
        sources.load_label_map(path)


def test_load_label_map_bad_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        sources.load_label_map(_text(tmp_path / "map.json", "{"))


# --------------------------------------------------------------------------- splits


def _synthetic(n: int = 1000, seed: int = 1) -> list[Record]:
    """Training records with 1-3 images per patient, plus a few test-source records."""
    rng = random.Random(seed)
    out: list[Record] = []
    i = 0
    patient = 0
    while i < n:
        patient += 1
        label = rng.choices(["TB", "NTB", "NORM"], weights=[2, 3, 5])[0]
        source = rng.choice(["nih_tb", "kermany", "tbx11k"])
        pid = "" if source == "tbx11k" else f"p{patient}"
        for _ in range(1 if not pid else rng.randint(1, 3)):
            out.append(Record(f"/data/{source}/{i:05d}.png", source, label, label, pid))
            i += 1
    out += [Record(f"/data/sz/{k}.png", "shenzhen", "1", "TB", f"{k:04d}") for k in range(20)]
    out += [Record(f"/data/mc/{k}.png", "montgomery", "0", "NORM", f"{k:04d}") for k in range(5)]
    return out


def test_splits_by_patient_and_test_sources() -> None:
    recs = sources.assign_splits(_synthetic(), seed=3)
    splits_of: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in recs:
        if r.patient_id:
            splits_of[(r.source, r.patient_id)].add(r.split)
        if r.source in ("shenzhen", "montgomery"):
            assert r.split == "test"
        else:
            assert r.split in ("train", "val")
    assert all(len(s) == 1 for s in splits_of.values())


def test_splits_stratified_fraction() -> None:
    recs = [r for r in sources.assign_splits(_synthetic(), val_fraction=0.2, seed=0)
            if r.split != "test"]
    for label in ("TB", "NTB", "NORM"):
        of_label = [r for r in recs if r.label == label]
        frac = sum(r.split == "val" for r in of_label) / len(of_label)
        assert abs(frac - 0.2) < 0.03, (label, frac)


def test_splits_deterministic_and_seeded() -> None:
    data = _synthetic()
    a = sources.assign_splits(data, seed=5)
    shuffled = list(data)
    random.Random(9).shuffle(shuffled)
    b = sources.assign_splits(shuffled, seed=5)
    assert a == b
    c = sources.assign_splits(data, seed=6)
    assert {r.path for r in a if r.split == "val"} != {r.path for r in c if r.split == "val"}


def test_splits_bad_fraction() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        sources.assign_splits([], val_fraction=1.0)


def test_splits_group_majority_label() -> None:
    # One patient with mixed labels stays in one split whatever the stratum.
    recs = [Record(f"/x/{i}.png", "nih_tb", "TB", "TB" if i else "NTB", "p1") for i in range(3)]
    assert len({r.split for r in sources.assign_splits(recs, val_fraction=0.5)}) == 1


# --------------------------------------------------------------------------- manifest


def test_manifest_round_trip(tmp_path: Path) -> None:
    recs = sources.assign_splits(_synthetic(50))
    recs[0] = Record("/p, with \"comma\".png", "phantom", "TB", "TB", "1.2", "train",
                     "[[1, 2, 3, 4]]", "", '{"left": "/m/l.png", "right": "/m/r.png"}')
    path = tmp_path / "out" / "manifest.csv"
    sources.write_manifest(recs, path)
    assert path.read_text().splitlines()[0] == (
        "path,source,source_label,label,patient_id,split,boxes,official_split,lung_masks")
    assert sources.read_manifest(path) == recs


def test_read_manifest_rejects_bad_label(tmp_path: Path) -> None:
    path = _text(tmp_path / "m.csv", "path,source,source_label,label,patient_id,split\n"
                 "/a.png,nih_tb,TB,tb,p,train\n")
    with pytest.raises(ValueError, match="line 2"):
        sources.read_manifest(path)


def test_summarize() -> None:
    recs = sources.assign_splits(_synthetic(100))
    s = sources.summarize(recs)
    assert s["total"] == len(recs)
    assert s["by_source"]["shenzhen"] == {"TB": {"test": 20}}
    assert sum(n for c in s["by_split"].values() for n in c.values()) == len(recs)
    assert "shenzhen" in sources.format_summary(s)


def test_build_manifest(tmp_path: Path, shenzhen_tree: Path, kermany_tree: Path,
                        tbx11k_tree: Path, nih_tree: Path, phantom_tree: Path) -> None:
    out = tmp_path / "runs" / "manifest.csv"
    recs = sources.build_manifest(
        {"shenzhen": shenzhen_tree, "kermany": kermany_tree, "tbx11k": tbx11k_tree,
         "nih_tb": nih_tree, "phantom": phantom_tree},
        out, label_map={"kermany": {"PNEUMONIA": "NTB", "NORMAL": ""}}, seed=1)
    assert sources.read_manifest(out) == recs
    assert {r.split for r in recs if r.source == "shenzhen"} == {"test"}
    assert {r.label for r in recs if r.source == "kermany"} == {"NTB"}
    summary = json.loads(sources.summary_path(out).read_text())
    assert summary["counts"]["total"] == len(recs)
    assert summary["sources"]["tbx11k"]["skipped"]["unlabeled_test"] == 2
    assert summary["sources"]["kermany"]["skipped"]["dropped_by_label_map:NORMAL"] == 5
    assert summary["label_map"]["kermany"]["NORMAL"] == ""
    with pytest.raises(ValueError, match="Unknown source"):
        sources.build_manifest({"padchest": tmp_path}, out)


def test_phantom_lung_masks(tmp_path: Path) -> None:
    from training import phantoms

    gt = phantoms.generate_studies(tmp_path / "ph", 12, seed=2, size=(122, 100), masks=True)
    (tmp_path / "ph" / gt[0].right_mask).unlink()
    res = sources.index_phantom(tmp_path / "ph")
    by_path = {Path(r.path).relative_to((tmp_path / "ph").resolve()).as_posix(): r
               for r in res.records}
    assert res.notes == {"missing_lung_mask": 1}
    assert by_path[gt[0].path].lung_masks == ""
    for row in gt[1:]:
        rec = by_path[row.path]
        if row.view == "LL":
            assert rec.lung_masks == ""
            continue
        spec = json.loads(rec.lung_masks)
        assert spec == {"left": str((tmp_path / "ph" / row.left_mask).resolve()),
                        "right": str((tmp_path / "ph" / row.right_mask).resolve())}
        left, right = read_lung_masks(rec.lung_masks)
        assert left.any() == right.any() == (row.body_part == "CHEST")


def test_index_command_test_sources(montgomery_tree: Path, tmp_path: Path) -> None:
    from training.cli import main

    out = tmp_path / "m.csv"
    assert main(["index", "--source", f"montgomery={montgomery_tree}", "--out", str(out)]) == 0
    assert {r.split for r in sources.read_manifest(out)} == {"test"}  # the default
    assert main(["index", "--source", f"montgomery={montgomery_tree}", "--out", str(out),
                 "--test-sources", "", "--val-fraction", "0.34"]) == 0
    assert {r.split for r in sources.read_manifest(out)} == {"train", "val"}
