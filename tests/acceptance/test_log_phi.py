"""No patient data in the log of ``cxrd serve`` at INFO: not from the data sets, and not
from file names (exports often name files after the patient)."""

from __future__ import annotations

import shutil

import pytest
from nodehelpers import (
    DONE_TIMEOUT,
    PHI_BIRTH_DATE,
    PHI_BIRTH_DATE_MALFORMED,
    PHI_ID,
    PHI_NAME,
    check_outcome,
    phi_study,
    settled,
    wait_until,
    write_config,
)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # writing the fixture
def test_no_patient_data_in_the_log(tmp_path, nodes, db_of):
    study = phi_study(tmp_path / "in")
    dirs = write_config(tmp_path, level="INFO")
    db = db_of(dirs)
    node = nodes.start(dirs)
    dirs.incoming.mkdir(parents=True, exist_ok=True)
    name_part = PHI_NAME.replace("^", "_")
    for i, f in enumerate(study.files):
        shutil.copyfile(study.folder / f.path,
                        dirs.incoming / f"{name_part}_{PHI_ID}_{PHI_BIRTH_DATE}_{i}.dcm")
    (dirs.incoming / f"{name_part}_{PHI_ID}.txt").write_text("not DICOM\n")  # rejected
    wait_until(lambda: settled(dirs, db), DONE_TIMEOUT, "the study to be reported")
    assert node.stop() == 0
    check_outcome(dirs, db, study.files)

    log = node.log()
    assert "action=study-reported" in log and "action=rejected" in log
    for uid in {f.sop_instance_uid for f in study.files}:
        assert uid in log
    for phi in (PHI_NAME, "PHITEST", "SENTINEL", PHI_ID, PHI_BIRTH_DATE, PHI_BIRTH_DATE_MALFORMED):
        lines = [ln for ln in log.splitlines() if phi in ln]
        assert not lines, f"{phi!r} in the log:\n" + "\n".join(lines)
