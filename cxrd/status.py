"""``cxrd status``: what the queue holds, why images were skipped or refused, what failed,
what is waiting to be sent, and the model and execution providers in use."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import func, select

from cxrd.actions import recent
from cxrd.config import Config
from cxrd.db import Database, Delivery, Instance, Job, Rejection, Result, Study, Worker, utcnow
from cxrd.domain import DeliveryState, JobKind, JobState, RejectReason, ResultKind
from cxrd.findings import decide_class
from cxrd.infer import resolve_model_path, resolve_segmenter_path
from cxrd.modelinfo import CLASS_NAMES, ModelInfo, read_model_info, read_segmentation_info
from cxrd.queue import unresolved_failures
from cxrd.retention import storage_status
from cxrd.space import node_space

RECENT = 10
WORKER_STALE_SECONDS = 60


def _counts(s: Any, column: Any, *conditions: Any) -> dict[str, int]:
    query = select(column, func.count()).where(*conditions).group_by(column)
    return {str(k): int(n) for k, n in s.execute(query).all()}


def _count(s: Any, model: Any, *conditions: Any) -> int:
    """Rows of ``model`` meeting every condition."""
    return int(s.scalar(select(func.count()).select_from(model).where(*conditions)) or 0)


def _by_destination(s: Any) -> dict[str, dict[str, Any]]:
    """Each destination's deliveries: counts by state, how many it stored with a warning
    status, the error of its newest undelivered delivery and its newest warning."""
    done = DeliveryState.DONE.value
    found: dict[str, dict[str, Any]] = {}
    for name, state, n in s.execute(select(Delivery.destination, Delivery.state, func.count())
                                    .group_by(Delivery.destination, Delivery.state)):
        entry = found.setdefault(str(name), {"by_state": {}, "with_warning": 0,
                                             "last_error": None, "last_warning": None})
        entry["by_state"][str(state)] = int(n)
    for name, entry in found.items():
        noted = Delivery.last_error.is_not(None)
        entry["with_warning"] = _count(s, Delivery, Delivery.destination == name,
                                       Delivery.state == done, noted)
        entry["last_error"] = s.scalar(select(Delivery.last_error).where(
            Delivery.destination == name, Delivery.state != done, noted)
            .order_by(Delivery.id.desc()).limit(1))
        entry["last_warning"] = s.scalar(select(Delivery.last_error).where(
            Delivery.destination == name, Delivery.state == done, noted)
            .order_by(Delivery.id.desc()).limit(1))
    return found


def _recent_results(s: Any, info: ModelInfo, workers: list[dict[str, Any]],
                    segmenter: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The newest results (SR, SC, SEG), each with the findings it carries: for an SR every
    image of its study generation, for an SC or a SEG its source image; a finding's class
    is the SR's (``decide_class`` at the model's operating point) when the classify job ran
    the configured model, else None (another model's threshold is not known here).

    Only UIDs, kinds, times and the classify jobs' probabilities are read: never
    ``Job.record`` (the source's header, patient attributes included), so no patient data
    can reach ``status`` or the status page from here."""
    rows = s.execute(
        select(Result.kind, Result.study_instance_uid, Result.sop_instance_uid,
               Result.source_sop_instance_uid, Result.generation, Result.created_at,
               Result.purged_at)
        .order_by(Result.id.desc()).limit(RECENT)).all()
    studies = {r.study_instance_uid for r in rows}
    jobs: dict[tuple[str, int], list[tuple[str, str, str | None]]] = {}
    if studies:
        # By study alone, the rest sifted here: with the state in the query, SQLite walks
        # every done job (ix_jobs_claim) rather than the few of these studies. The join
        # leaves out report jobs (no instance).
        for study, generation, state, sop, probs, device_uid in s.execute(
            select(Job.study_instance_uid, Job.generation, Job.state,
                   Instance.sop_instance_uid, Job.probs, Job.model_device_uid)
            .join(Instance, Job.instance_id == Instance.id)
            .where(Job.study_instance_uid.in_(studies))
            .order_by(Job.id)
        ):
            if state == JobState.DONE.value and probs is not None:
                jobs.setdefault((study, generation), []).append((sop, probs, device_uid))
    # The models a result may name: the configured one, and those workers last ran.
    models = {w["device_uid"]: {"display_name": w["model"], "device_uid": w["device_uid"],
                                "demo": w["demo"]} for w in workers}
    models[info.device_uid] = {"display_name": info.display_name,
                               "device_uid": info.device_uid, "demo": info.demo}

    def finding(sop: str, probs: str, device_uid: str | None) -> dict[str, Any]:
        p = [float(x) for x in json.loads(probs)]
        k = (decide_class(p, info.operating_point.tb_threshold)
             if device_uid == info.device_uid else None)
        return {"sop_instance_uid": sop,
                "class": CLASS_NAMES[k] if k is not None else None,
                "probability": p[k] if k is not None else None,
                "probabilities": dict(zip(CLASS_NAMES, p, strict=False))}

    found = []
    for r in rows:
        images = jobs.get((r.study_instance_uid, r.generation), [])
        if r.kind != ResultKind.SR.value:
            images = [j for j in images if j[0] == r.source_sop_instance_uid]
        findings, model = [], None
        for sop, probs, device_uid in images:
            findings.append(finding(sop, probs, device_uid))
            model = models.get(device_uid or "", {"display_name": None,
                                                  "device_uid": device_uid, "demo": None})
        if r.kind == ResultKind.SEG.value and segmenter is not None:
            # Which segmenter wrote a SEG is not recorded: the one configured now.
            model = {"display_name": segmenter["display_name"],
                     "device_uid": segmenter["device_uid"], "demo": segmenter["demo"]}
        found.append({
            "kind": r.kind,
            "study_instance_uid": r.study_instance_uid,
            "sop_instance_uid": r.sop_instance_uid,
            "source_sop_instance_uid": r.source_sop_instance_uid,
            "generation": r.generation,
            "at": r.created_at.isoformat() + "Z",
            "purged": r.purged_at is not None,
            "model": model,
            "findings": findings,
        })
    return found


def segmenter_status(config: Config) -> dict[str, Any] | None:
    """The lung-field segmenter the workers run (``[model] segmenter``), as ``model``
    shows the classifier; None when it is "off"."""
    if not config.model.uses_segmenter:
        return None
    path = resolve_segmenter_path(config.model.segmenter)
    seg = read_segmentation_info(path)
    return {"name": seg.name, "version": seg.version, "display_name": seg.display_name,
            "device_uid": seg.device_uid, "demo": seg.demo, "path": str(path),
            "preprocessing": seg.preprocessing,
            "min_lung_fraction": config.model.min_lung_fraction,
            "segmentation_written": config.results.segmentation}


def collect(config: Config, db: Database) -> dict[str, Any]:
    """The status document (its shape is documented in the README)."""
    info = read_model_info(resolve_model_path(config.model.path))
    now = utcnow()
    with db.session() as s:
        workers = [
            {
                "id": w.id,
                # lease owners are "<[node] id>:<pid>:w<n>" (cxrd.worker.worker_id_prefix)
                "node": w.id.split(":", 1)[0],
                "model": w.model,
                "device_uid": w.model_device_uid,
                "demo": w.demo,
                "providers": [p for p in w.providers.split(",") if p],
                "heartbeat_at": w.heartbeat_at.isoformat() + "Z",
                "processed": w.processed,
                "alive": (now - w.heartbeat_at) < dt.timedelta(seconds=WORKER_STALE_SECONDS),
            }
            for w in s.scalars(select(Worker).order_by(Worker.heartbeat_at.desc()).limit(20))
        ]
        failures = [
            {
                "kind": job.kind,
                "sop_instance_uid": inst.sop_instance_uid if inst is not None else None,
                "study_instance_uid": job.study_instance_uid,
                "error": job.error,
                "attempts": job.attempts,
                "at": job.finished_at.isoformat() + "Z" if job.finished_at else None,
                # answered since by `cxrd jobs retry` or `cxrd reprocess`
                "resolved": not unresolved,
            }
            for job, inst, unresolved in s.execute(
                select(Job, Instance, unresolved_failures())
                .outerjoin(Instance, Job.instance_id == Instance.id)
                .where(Job.state == JobState.FAILED.value)
                .order_by(Job.id.desc())
                .limit(RECENT)
            )
        ]
        rejections = [
            {
                "at": r.at.isoformat() + "Z",
                "reason": r.reason,
                "detail": r.detail,
                "source": r.source,
                "moved_to": r.moved_to,
            }
            for r in s.scalars(select(Rejection).order_by(Rejection.id.desc()).limit(RECENT))
        ]
        dead = [
            {
                "destination": d.destination,
                "sop_instance_uid": r.sop_instance_uid,
                "attempts": d.attempts,
                "last_error": d.last_error,
            }
            for d, r in s.execute(
                select(Delivery, Result)
                .join(Result, Delivery.result_id == Result.id)
                .where(Delivery.state == DeliveryState.DEAD.value)
                .order_by(Delivery.id.desc())
                .limit(RECENT)
            )
        ]
        pending_errors = [
            {
                "destination": d.destination,
                "sop_instance_uid": r.sop_instance_uid,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "next_attempt_at": d.next_attempt_at.isoformat() + "Z",
            }
            for d, r in s.execute(
                select(Delivery, Result)
                .join(Result, Delivery.result_id == Result.id)
                .where(
                    Delivery.state == DeliveryState.PENDING.value, Delivery.last_error.is_not(None)
                )
                .order_by(Delivery.id.desc())
                .limit(RECENT)
            )
        ]
        segmenter = segmenter_status(config)
        doc: dict[str, Any] = {
            "node": {
                "id": config.node.id,
                "ae_title": config.node.ae_title,
                "port": config.node.port,
                "data_dir": str(config.storage.data_dir),
                # the STOW-RS receiver's "host:port" ([dicomweb] listen); null: off
                "dicomweb": config.dicomweb.listen or None,
            },
            "model": {
                "name": info.name,
                "version": info.version,
                "display_name": info.display_name,
                "device_uid": info.device_uid,
                "demo": info.demo,
                "path": str(resolve_model_path(config.model.path)),
                "tb_threshold": info.operating_point.tb_threshold,
                "providers_configured": list(config.model.providers),
            },
            "segmenter": segmenter,
            "workers": workers,
            "instances": _counts(s, Instance.state),
            "skipped": {k: v for k, v in _counts(s, Instance.reason).items() if k != "None"},
            "studies": _counts(s, Study.state),
            "jobs": _counts(s, Job.state),
            "report_jobs": _counts(s, Job.state, Job.kind == JobKind.REPORT.value),
            "queue_depth": _count(
                s, Job, Job.state.in_((JobState.PENDING.value, JobState.RUNNING.value))
            ),
            # Failed and not answered since: a reprocess of the study (a new generation)
            # or `cxrd jobs retry` (a new job for the image) answers a failure, so it no
            # longer makes the node unhealthy; if the retry fails too, that failure counts.
            "jobs_failed_unresolved": _count(s, Job, unresolved_failures()),
            "results": _counts(s, Result.kind),
            # One current SR per reported study; a reprocess supersedes (never deletes) it.
            "reports": {
                "current": _count(s, Study, Study.sr_sop_instance_uid.is_not(None)),
                "superseded": _count(
                    s,
                    Result,
                    Result.kind == ResultKind.SR.value,
                    Result.sop_instance_uid.in_(
                        select(Result.supersedes).where(Result.supersedes.is_not(None))
                    ),
                ),
            },
            "disk": disk_status(config, _count(
                s, Rejection, Rejection.reason == RejectReason.DISK_LOW.value)),
            "rejected": _counts(s, Rejection.reason),
            "recent_rejections": rejections,
            "recent_failures": failures,
            "deliveries": {
                "by_state": _counts(s, Delivery.state),
                "recent_dead": dead,
                "pending_with_errors": pending_errors,
                # stored by the destination with a warning status (kept in last_error)
                "recent_warnings": [
                    {
                        "destination": d.destination,
                        "sop_instance_uid": r.sop_instance_uid,
                        "warning": d.last_error,
                    }
                    for d, r in s.execute(
                        select(Delivery, Result)
                        .join(Result, Delivery.result_id == Result.id)
                        .where(Delivery.state == DeliveryState.DONE.value,
                               Delivery.last_error.is_not(None))
                        .order_by(Delivery.id.desc())
                        .limit(RECENT)
                    )
                ],
                "by_destination": _by_destination(s),
            },
            # the newest SRs, SCs and SEGs: UIDs, findings, model; never patient data
            "recent_results": _recent_results(s, info, workers, segmenter),
            # `cxrd deliveries retry` and `cxrd jobs retry`: who ran them, when, how many
            "operator_actions": recent(s, RECENT),
            # bytes in use, free space, retention and the last purge
            "storage": storage_status(config, s),
        }
        # A dead delivery whose result retention purged can no longer be sent again
        # (`cxrd deliveries retry` skips it): it stays in by_state, not in the health.
        doc["deliveries"]["dead_purged"] = _count(
            s, Delivery, Delivery.state == DeliveryState.DEAD.value,
            Delivery.result_id.in_(select(Result.id).where(Result.purged_at.is_not(None))))
    # [model] require_cuda: a live worker off CUDA (or none at all) cannot do the job asked.
    live: list[Any] = [w["providers"] for w in workers if w["alive"]]
    doc["cuda_required_unmet"] = bool(config.model.require_cuda) and (
        not live or any("CUDAExecutionProvider" not in providers for providers in live))
    doc["healthy"] = (
        doc["jobs_failed_unresolved"] == 0
        and doc["deliveries"]["by_state"].get(DeliveryState.DEAD.value, 0)
        == doc["deliveries"]["dead_purged"]
        and not doc["cuda_required_unmet"]
        and not doc["disk"]["low"]
    )
    return doc


def disk_status(config: Config, refused: int) -> dict[str, Any]:
    """Free space on the spool's (and the results') file system against ``[storage]
    min_free_mb``; ``refused``: C-STOREs answered 0xA700 for it so far."""
    space = node_space(config)  # S3: no check (cxrd.space)
    try:
        filesystems = [{"path": str(fs.path), "free_mb": fs.free_mb,
                        "total_mb": fs.total_bytes // (1024 * 1024)}
                       for fs in space.filesystems()]
        low = space.low()
    except OSError as exc:
        filesystems, low = [], f"cannot look at the disk: {exc.strerror or exc}"
    return {"min_free_mb": space.min_free_mb, "filesystems": filesystems,
            "low": low is not None, "low_reason": low, "refused": refused}


def _size(n: int) -> str:
    """Bytes for people: ``12.3 MB`` (decimal units, as ``df -H``), exact below 1 kB."""
    value = float(n)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} bytes"  # pragma: no cover


def render(doc: dict[str, Any]) -> str:
    """Human-readable form of ``collect``'s document."""
    m = doc["model"]
    demo = "  ** DEMO: synthetic phantoms, not for clinical use **" if m["demo"] else ""
    lines = [
        f"cxrd node {doc['node']['id']} ae_title {doc['node']['ae_title']} port "
        f"{doc['node']['port']} data {doc['node']['data_dir']}",
        f"model: {m['display_name']} (device {m['device_uid']}, TB threshold "
        f"{m['tb_threshold']:.3f}){demo}",
    ]
    seg = doc.get("segmenter")
    if seg is None:
        lines.append("segmenter: off (no lung SEG, no lung-field gate)")
    else:
        lines.append(
            f"segmenter: {seg['display_name']} (device {seg['device_uid']}, min lung "
            f"fraction {seg['min_lung_fraction']:g}, SEG "
            f"{'written' if seg['segmentation_written'] else 'not written'})"
            + ("  ** DEMO: synthetic phantoms, not for clinical use **" if seg["demo"]
               else ""))
    for w in doc["workers"]:
        lines.append(
            f"  worker {w['id']} (node {w['node']}): providers "
            f"{','.join(w['providers'])} processed {w['processed']} "
            f"{'alive' if w['alive'] else 'stale'}"
        )

    def fmt(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"

    lines += [
        f"instances: {fmt(doc['instances'])}",
        f"skipped by reason: {fmt(doc['skipped'])}",
        f"rejected by reason: {fmt(doc['rejected'])}",
        f"studies: {fmt(doc['studies'])}",
        f"jobs: {fmt(doc['jobs'])} (queue depth {doc['queue_depth']})",
        f"results: {fmt(doc['results'])}",
        f"reports: {doc['reports']['current']} current SR, "
        f"{doc['reports']['superseded']} superseded",
        f"deliveries: {fmt(doc['deliveries']['by_state'])}",
    ]
    disk = doc["disk"]
    spaces = ", ".join(f"{fs['path']} {fs['free_mb']} MB free" for fs in disk["filesystems"])
    lines.append(f"disk: {spaces or 'unknown'} (min_free_mb {disk['min_free_mb']}); "
                 f"C-STOREs refused for low disk: {disk['refused']}")
    if disk["low"]:
        lines.append(f"  DISK LOW: C-STORE answers 0xA700 and watched files wait; "
                     f"{disk['low_reason']}")
    st = doc["storage"]
    results = (_size(st["results_bytes"]) if st["results_bytes"] is not None
               else f"unknown ({st['results_error']})")
    lines.append(f"store: {st['store']}")
    lines.append(f"storage: spool {_size(st['spool_bytes'])}, results "
                 f"{results}; retention "
                 + (f"{st['retention_days']} days" if st["retention_days"] else "off (keep)"))
    for fs in st["file_systems"]:
        lines.append(f"  free {_size(fs['free_bytes'])} of {_size(fs['total_bytes'])} on "
                     f"{fs['path']} ({', '.join(fs['holds'])})")
    last = st["last_purge"]
    lines.append("last purge: never" if last is None else
                 f"last purge: {last['at']} ({last['trigger']}, before {last['before']}): "
                 f"{last['instances']} instances in {last['studies']} studies "
                 f"({_size(last['spool_bytes'])}), {last['results']} results "
                 f"({_size(last['result_bytes'])}), {last['results_kept']} results kept "
                 "undelivered")
    for f in doc["recent_failures"]:
        if not f["resolved"]:
            lines.append(f"  failed {f['sop_instance_uid'] or 'report ' + f['study_instance_uid']}"
                         f": {f['error']}")
    for name, entry in sorted(doc["deliveries"]["by_destination"].items()):
        line = f"  to {name}: {fmt(entry['by_state'])}"
        if entry["with_warning"]:
            line += f"; {entry['with_warning']} stored with a warning ({entry['last_warning']})"
        if entry["last_error"]:
            line += f"; last error: {entry['last_error']}"
        lines.append(line)
    for d in doc["deliveries"]["recent_dead"]:
        lines.append(
            f"  dead delivery {d['sop_instance_uid']} -> {d['destination']}: {d['last_error']}"
        )
    for r in doc["recent_rejections"][:5]:
        lines.append(f"  rejected ({r['reason']}): {r['detail']}")
    for a in doc["operator_actions"][:5]:
        lines.append(f"  operator {a['at']} {a['actor']}: {a['action']} "
                     f"{a['scope'] or 'all'} re-queued {a['count']}"
                     + (f" ({a['detail']})" if a["detail"] else ""))
    lines.append("healthy" if doc["healthy"] else "UNHEALTHY: failed jobs, dead deliveries, "
                 "CUDA required but not in use, or disk low")
    return "\n".join(lines)
