"""The other subcommands as an operator runs them: predict, status, reprocess, check-config."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pydicom
import pytest
from nodehelpers import (
    DONE_TIMEOUT,
    IMAGE_SIZE,
    check_outcome,
    frontal_set,
    run_cli,
    settled,
    shared_database,
    sr_predecessors,
    sr_probabilities,
    sr_references,
    sr_results,
    status_json,
    wait_until,
    write_config,
)
from sqlalchemy import select

from cxrd.db import Study
from cxrd.modelinfo import CLASS_NAMES
from training.phantoms import DicomOptions, make_non_chest, random_patient_study, write_dicom

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
STATUS_KEYS = ("instances", "studies", "jobs", "skipped", "rejected", "deliveries", "model",
               "workers", "healthy", "queue_depth")


def test_predict_prints_classes_and_writes_an_sc_and_a_seg_per_file_and_one_sr(tmp_path):
    inputs = frontal_set(tmp_path / "in", n_studies=1, per_study=2, seed=7)
    dirs = write_config(tmp_path)
    out = tmp_path / "out"
    paths = [str(inputs.folder / f.path) for f in inputs.files]
    done = run_cli("predict", *paths, "--out", str(out), "--config", str(dirs.config),
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    printed: dict[str, dict[str, float]] = {}
    for path, f in zip(paths, inputs.files, strict=True):
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith(f"{path}:")]
        assert len(lines) == 1, done.stdout
        words = lines[0][len(path) + 1:].split()
        # "TB 0.331  NTB 0.333  NORM 0.336  -> NORM [(TB at threshold ...)]"
        assert words[0:6:2] == list(CLASS_NAMES), lines[0]
        assert words[6] == "->" and words[7] in CLASS_NAMES, lines[0]
        printed[f.sop_instance_uid] = {c: float(v) for c, v in zip(CLASS_NAMES, words[1:6:2],
                                                                    strict=True)}

    written = sorted(out.iterdir())
    assert not [p for p in written if p.name.startswith(".") or p.suffix != ".dcm"], written
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in written}
    srs = [p for p, ds in headers.items() if ds.Modality == "SR"]
    scs = [p for p, ds in headers.items() if ds.SOPClassUID == SECONDARY_CAPTURE]
    segs = [p for p, ds in headers.items() if ds.SOPClassUID == SEGMENTATION]
    assert len(srs) == 1 and len(scs) == 2 and len(segs) == 2 and len(written) == 5, written
    for results in (scs, segs):  # the node's steps: an SC and a lung SEG per image
        sources = sorted(str(headers[p].SourceImageSequence[0].ReferencedSOPInstanceUID)
                         for p in results)
        assert sources == sorted(printed)
    study_uid, refs = sr_references(srs[0])
    assert study_uid == inputs.files[0].study_instance_uid
    assert refs == set(printed)
    # ... and its SCs and SEGs (IHE AIR), each naming the SR's series
    assert sr_results(srs[0]) == {str(headers[p].SOPInstanceUID) for p in (*scs, *segs)}
    for p in (*scs, *segs):
        assert headers[p].RelatedSeriesSequence[0].SeriesInstanceUID == (
            headers[srs[0]].SeriesInstanceUID)
    in_sr = sr_probabilities(srs[0])
    assert in_sr.keys() == printed.keys()
    for uid, probs in printed.items():  # printed with 3 decimals
        assert all(abs(in_sr[uid][c] - probs[c]) <= 0.0005 for c in CLASS_NAMES)


def test_status_then_reprocess_supersedes_the_sr(tmp_path, nodes, db_of):
    inputs = frontal_set(tmp_path / "in", n_studies=1, per_study=2, seed=11)
    dirs = write_config(tmp_path)
    db = db_of(dirs)
    node = nodes.start(dirs)
    inputs.drop(dirs.incoming)
    wait_until(lambda: settled(dirs, db), DONE_TIMEOUT, "the study to be reported")

    doc = status_json(dirs)
    assert set(STATUS_KEYS) <= doc.keys()
    assert doc["healthy"] is True and doc["queue_depth"] == 0
    assert doc["instances"] == {"done": 2} and doc["studies"] == {"reported": 1}
    assert doc["model"]["providers_configured"] == ["CPUExecutionProvider"]
    alive = [w for w in doc["workers"] if w["alive"]]
    assert len(alive) == 1
    assert alive[0]["providers"] == ["CPUExecutionProvider"]
    assert alive[0]["model"] == doc["model"]["display_name"]
    assert alive[0]["device_uid"] == doc["model"]["device_uid"]
    assert doc["reports"] == {"current": 1, "superseded": 0}

    study_uid = inputs.files[0].study_instance_uid
    with db.session() as s:
        first_sr = s.scalars(select(Study.sr_sop_instance_uid)).one()
    assert first_sr

    done = run_cli("reprocess", "--since", "2000-01-01", "--config", str(dirs.config))
    assert done.returncode == 0, done.stderr
    assert "queued 2 images in 1 studies" in done.stdout

    def new_sr() -> str | None:
        with db.session() as s:
            uid = s.scalars(select(Study.sr_sop_instance_uid)).one()
        return uid if uid != first_sr and settled(dirs, db) else None

    second_sr = wait_until(new_sr, DONE_TIMEOUT, "the reprocessed study's new SR")
    assert sr_predecessors(dirs.results / f"{second_sr}.dcm") == {first_sr}
    # the old SR stays (it was sent; the new one supersedes it), and names its images too
    assert sr_references(dirs.results / f"{first_sr}.dcm")[1] == {
        f.sop_instance_uid for f in inputs.files}

    doc = status_json(dirs)
    assert doc["studies"] == {"reported": 1}
    assert doc["reports"] == {"current": 1, "superseded": 1}
    text = run_cli("status", "--config", str(dirs.config))
    assert text.returncode == 0, text.stderr
    assert "reports: 1 current SR, 1 superseded" in text.stdout
    assert node.stop() == 0

    # the current SR names the new generation's results (its probabilities included)
    outcome = check_outcome(dirs, db, inputs.files)
    assert outcome["srs"] == 2 and outcome["scs"] == 4  # two generations of each
    assert outcome["studies"][study_uid].generation == 2


@pytest.mark.parametrize("toml, keys", [
    ('[study]\nstable_seconds = -1\n[workers]\nprocesess = 2\n',
     ["study.stable_seconds", "workers.procesess"]),
    ('[model]\nproviders = ["CUDAExecutionProvidr"]\n', ["model.providers"]),
])
def test_check_config_names_each_bad_key(tmp_path, toml, keys):
    bad = tmp_path / "bad.toml"
    bad.write_text(toml)
    done = run_cli("check-config", "--config", str(bad))
    assert done.returncode != 0
    for key in keys:
        assert key in done.stderr, done.stderr


def test_check_config_names_each_bad_stow_destination_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[destinations]]\nname = "web"\nurl = "http://h/dicom-web/studies"\n'
                   'ae_title = "PACS"\ntoken = "s3cret"\n')
    done = run_cli("check-config", "--config", str(bad))
    assert done.returncode != 0
    for text in ('destinations[0].url: "http://h/dicom-web/studies" is not allowed; expected '
                 "the DICOMweb base URL, without /studies (cxrd adds it)",
                 "destinations[0].ae_title: not allowed with url",
                 "destinations[0].token: secrets are not written in the configuration file"):
        assert text in done.stderr, done.stderr
    assert "s3cret" not in done.stderr + done.stdout


def test_check_config_reports_a_stow_secret_it_cannot_read(tmp_path):
    dirs = write_config(tmp_path)
    token = tmp_path / "token"
    token.write_text("\n")  # empty once its newline is dropped
    with dirs.config.open("a") as fh:
        fh.write('\n[[destinations]]\nname = "web"\nurl = "http://127.0.0.1:9/dicom-web"\n'
                 f'token_file = "{token}"\n[[destinations]]\nname = "env"\n'
                 'url = "http://127.0.0.1:9/dicom-web"\nusername = "u"\n'
                 'password_env = "CXRD_TEST_UNSET_PASSWORD"\n')
    done = run_cli("check-config", "--config", str(dirs.config))
    assert done.returncode != 0, done.stderr
    assert f"problem: destinations 'web' token_file {token} is empty" in done.stderr
    assert ("problem: destinations 'env' password_env: the environment variable "
            "CXRD_TEST_UNSET_PASSWORD is not set or empty") in done.stderr


def test_check_config_accepts_a_good_config(tmp_path):
    dirs = write_config(tmp_path)
    done = run_cli("check-config", "--config", str(dirs.config))
    assert done.returncode == 0, done.stderr
    described = json.loads(done.stdout)
    assert described["study"]["stable_seconds"] == 1


def test_serve_requiring_cuda_exits_before_listening_on_a_cpu_machine(tmp_path):
    """[model] require_cuda on a machine where onnxruntime has no CUDA: `cxrd serve` exits
    non-zero with one line that says why, and never starts its receiver."""
    import socket

    dirs = write_config(tmp_path, processes=1)
    text = dirs.config.read_text().replace(
        'providers = ["CPUExecutionProvider"]',
        'providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]\nrequire_cuda = true')
    dirs.config.write_text(text)
    port = int(text.split("port = ", 1)[1].split()[0])
    done = run_cli("serve", "--config", str(dirs.config), cwd=tmp_path)
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("cxrd:")]
    assert len(lines) == 1, done.stderr
    assert "require_cuda" in lines[0] and "CPUExecutionProvider" in lines[0], lines[0]
    assert "action=receive-start" not in done.stderr + done.stdout
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens there


def test_the_worker_refuses_a_session_without_cuda_when_required():
    from cxrd.errors import ModelError
    from cxrd.infer import Classifier

    with pytest.raises(ModelError, match="require_cuda"):
        Classifier(None, ["CUDAExecutionProvider", "CPUExecutionProvider"],
                   require_cuda=True)
    # the same session without the requirement falls back to the CPU and says so
    assert Classifier(None, ["CUDAExecutionProvider", "CPUExecutionProvider"]).providers == [
        "CPUExecutionProvider"]


def test_predict_skips_an_image_without_lung_fields_as_the_node_does(tmp_path):
    # a hand radiograph whose header says CHEST PA: the lung-field gate stops it
    rng = np.random.default_rng(3)
    while (hand := make_non_chest(rng, *IMAGE_SIZE)).body_part != "HAND":
        pass
    hand = replace(hand, body_part="CHEST", view="PA")
    path = tmp_path / "in" / "hand.dcm"
    path.parent.mkdir()
    write_dicom(hand, path, random_patient_study(rng), DicomOptions(modality="CR"))
    dirs = write_config(tmp_path)
    out = tmp_path / "out"
    done = run_cli("predict", str(path), "--out", str(out), "--config", str(dirs.config),
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{path}: skipped (no-lung-fields)" in done.stdout, done.stdout
    assert not any(out.glob("*.dcm"))  # nothing written for it, no SR for its study


def test_check_config_for_a_worker_node_checks_as_cxrd_worker_and_never_migrates(tmp_path):
    """`check-config --worker` runs the checks of `cxrd worker`: SQLite is refused, and a
    PostgreSQL database without cxrd's schema is reported, not migrated (a worker node never
    migrates); once a receiving node's check has migrated it, the worker check passes."""
    (tmp_path / "sqlite").mkdir()
    (tmp_path / "pg").mkdir()
    dirs = write_config(tmp_path / "sqlite")
    done = run_cli("check-config", "--worker", "--config", str(dirs.config))
    assert done.returncode != 0 and "SQLite" in done.stderr, done.stderr
    assert "cxrd worker would refuse to start" in done.stderr
    assert not dirs.data_dir.exists()  # no SQLite file made, nothing migrated
    with shared_database("cxrd_check") as url:
        dirs = write_config(tmp_path / "pg")
        dirs.config.write_text(dirs.config.read_text().replace(
            "[storage]\n", f'[storage]\ndatabase_url = "{url}"\n', 1))
        dirs.data_dir.mkdir(parents=True, exist_ok=True)
        worker = run_cli("check-config", "--worker", "--config", str(dirs.config))
        assert worker.returncode != 0 and "schema" in worker.stderr, worker.stderr
        assert run_cli("check-config", "--worker", "--config",
                       str(dirs.config)).returncode != 0  # still not migrated
        serve = run_cli("check-config", "--config", str(dirs.config))
        assert serve.returncode == 0, serve.stderr
        worker = run_cli("check-config", "--worker", "--config", str(dirs.config))
        assert worker.returncode == 0, worker.stderr
