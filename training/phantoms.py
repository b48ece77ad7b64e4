"""Synthetic chest radiograph phantoms with lesion boxes, written as PNG or DICOM.

The phantoms train and test the DEMO classifier (TB, NTB = abnormal but not TB, NORM) and
feed the daemon's tests and benchmarks with realistic CR/DX files. The class signal is
kept honest and simple:

* **TB**: lesions in the *upper* lung zones: a thick-walled cavity (a ring opacity with a
  lucent centre and surrounding infiltrate) or a cluster of nodules, sometimes bilateral;
* **NTB**: lesions in the *lower* zones: a soft-edged consolidation patch or a pleural
  effusion (a dense meniscus filling a costophrenic angle, hiding the diaphragm);
* **NORM**: no lesion.

Normal anatomy varies from image to image: body outline and soft-tissue falloff, two lung
fields with diaphragm domes and sharp costophrenic angles, mediastinum, trachea, spine,
heart, hila and vessel markings, posterior and anterior ribs, clavicles, gastric bubble,
optional collimation, exposure (gain, offset, gamma, heel effect), noise, patient size,
slight rotation and shift, and PA or AP projection.

Rendering is vectorised numpy in float32: the smooth anatomy is drawn on a working grid
of at most ``WORK_MAX`` pixels on the longer side (local structures only inside their own
bounding windows), resized bilinearly to the requested size with Pillow, and per-pixel
quantum noise is added at full resolution.

Every phantom is a function of the generator's state only: :func:`make_phantom` first
draws three seeds (anatomy, lesions, noise) in the same way for every label, so the same
generator state rendered as ``"TB"`` and as ``"NORM"`` gives the same patient, positioning
and noise, and differs only by the lesions.

Image convention: ``Phantom.image`` is float32 in [0, 1] with 1 = dense = white
(MONOCHROME2). Boxes are ``(x0, y0, x1, y1)`` in pixel coordinates of the full image,
x = column, *inclusive* on all sides (``image[y0:y1 + 1, x0:x1 + 1]``), as
``training.metrics`` reads them.

Lung-field masks (asked for with ``masks=True``; they do not change the image or draw on
the generator): ``Phantom.lungs`` is ``(left, right)``, boolean at full size, left and
right in the *patient's* sense, so on a PA or AP frontal the left lung lies on the image's
right. A lung field is what the renderer darkens as lung, at half strength or more: the
region behind the heart and mediastinum is left out (as in the public lung-mask sets),
the anatomical lung under a lesion or an effusion is kept. Non-chest images (hand, knee)
have no lung fields: both masks are empty. Laterals have none: the two lungs overlap and
cannot be told apart, so no masks are written for them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

__all__ = [
    "CLASSES",
    "CR_IMAGE_STORAGE",
    "DX_PRESENTATION_STORAGE",
    "DX_PROCESSING_STORAGE",
    "DicomOptions",
    "GroundTruth",
    "PatientStudy",
    "Phantom",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "generate_images",
    "generate_studies",
    "make_lateral",
    "make_non_chest",
    "make_phantom",
    "random_patient_study",
    "read_ground_truth",
    "to_dataset",
    "write_dicom",
    "write_lung_masks",
    "write_png",
]

Arr = npt.NDArray[Any]  # float32 arrays (numpy's stubs widen float32 arithmetic)
Box = tuple[int, int, int, int]
Slices = tuple[slice, slice]

CLASSES: tuple[str, ...] = ("TB", "NTB", "NORM")

#: Longest side of the grid the smooth anatomy is drawn on before resizing.
WORK_MAX = 384

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1.1"

#: Transfer syntaxes :func:`to_dataset` can write (the compressed ones need their encoder).
SUPPORTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    JPEGLSLossless,
)
_COMPRESSED = (RLELossless, JPEG2000Lossless, JPEGLSLossless)

GT_COLUMNS = ("path", "label", "boxes", "rows", "cols", "view", "body_part",
              "study_instance_uid", "sop_instance_uid", "left_mask", "right_mask")

_NOISE_LUT = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], dtype=np.float32)


# ============================================================================ data types


@dataclass(frozen=True)
class Phantom:
    """One synthetic radiograph and its ground truth."""

    image: np.ndarray  # (rows, cols) float32 in [0, 1], 1 = dense/white (MONOCHROME2 sense)
    label: str  # "TB" | "NTB" | "NORM"
    boxes: tuple[tuple[int, int, int, int], ...]  # (x0, y0, x1, y1), inclusive; empty for NORM
    view: str = "PA"  # "PA", "AP", "LL" (lateral), or "" for non-chest
    body_part: str = "CHEST"  # "CHEST", or "HAND"/"KNEE" for non-chest images
    # (left, right) lung-field masks, bool (rows, cols), patient's sense; None when not
    # asked for (or a lateral); both empty for a non-chest image
    lungs: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True)
class DicomOptions:
    """How :func:`to_dataset` encodes a phantom.

    ``window=False`` leaves WindowCenter/WindowWidth out, so viewers (and cxrd) fall back
    to a percentile window. It is valid for CR; a DX *For Presentation* image without a
    window or VOI LUT breaks a Type 1C rule (dciodvfy reports it), as many real ones do.
    DX *For Processing* images never carry a window (the standard forbids it there).
    """

    modality: str = "CR"  # "CR" or "DX"
    photometric: str = "MONOCHROME2"  # or "MONOCHROME1" (inverted stored values)
    bits_stored: int = 12  # 12 or 16 (BitsAllocated is always 16)
    transfer_syntax: str = ExplicitVRLittleEndian  # one of SUPPORTED_TRANSFER_SYNTAXES
    window: bool = True  # write WindowCenter/WindowWidth
    presentation_intent: str = "FOR PRESENTATION"  # DX only; or "FOR PROCESSING"


@dataclass(frozen=True)
class PatientStudy:
    """Fake patient and study attributes shared by the images of one study."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    study_instance_uid: str
    accession_number: str
    study_date: str
    study_time: str
    study_description: str
    referring_physician: str


@dataclass(frozen=True)
class GroundTruth:
    """One row of ``ground_truth.csv``."""

    path: str
    label: str
    boxes: tuple[tuple[int, int, int, int], ...]
    rows: int
    cols: int
    view: str
    body_part: str
    study_instance_uid: str
    sop_instance_uid: str
    left_mask: str = ""  # the lung-field mask PNGs, relative to the CSV ("" = none written)
    right_mask: str = ""


# ============================================================================ drawing helpers


def _sstep(x: Arr, e0: float, e1: float) -> Arr:
    """Smoothstep from 0 at ``e0`` to 1 at ``e1`` (float32)."""
    t = (x - np.float32(e0)) * np.float32(1.0 / (e1 - e0))
    np.clip(t, 0.0, 1.0, out=t)
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


def _ramp(x: Arr, e0: float, e1: float) -> Arr:
    """Linear ramp from 0 at ``e0`` to 1 at ``e1`` (float32)."""
    t = (x - np.float32(e0)) * np.float32(1.0 / (e1 - e0))
    np.clip(t, 0.0, 1.0, out=t)
    return t


def _dome(x: Arr, power: float = 0.5) -> Arr:
    """``max(0, 1 - x) ** power``: the projection profile of a sphere/cylinder for x = d**2.

    ``power`` is one of 0.25, 0.5, 1, 1.5 (cheap roots only).
    """
    t = np.float32(1.0) - x
    np.clip(t, 0.0, 1.0, out=t)
    if power == 1.0:
        return t
    r = np.sqrt(t)
    if power == 0.25:
        np.sqrt(r, out=r)
    elif power == 1.5:
        r *= t
    elif power != 0.5:
        raise ValueError(f"unsupported power {power}")
    return r


def _capsule_d2(x: Arr, y: Arr, p0: tuple[float, float], p1: tuple[float, float]) -> Arr:
    """Squared distance from (x, y) to the segment p0-p1."""
    vx, vy = p1[0] - p0[0], p1[1] - p0[1]
    ll = vx * vx + vy * vy or 1e-12
    dx = x - np.float32(p0[0])
    dy = y - np.float32(p0[1])
    t = (dx * np.float32(vx) + dy * np.float32(vy)) * np.float32(1.0 / ll)
    np.clip(t, 0.0, 1.0, out=t)
    dx -= t * np.float32(vx)
    dy -= t * np.float32(vy)
    return dx * dx + dy * dy


def _lowres_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> Arr:
    """Smooth unit-variance-ish noise: a small random grid resized bicubically to (h, w)."""
    small = rng.standard_normal(cells).astype(np.float32)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    return np.array(img, dtype=np.float32)


class _Grid:
    """The working grid: anatomical coordinates of every working pixel.

    Anatomical coordinates are isotropic, in units of the image *width* (before the
    patient-size factor): ``ax`` runs left to right across the image (negative = the
    patient's right on a PA/AP view), ``ay`` downwards; (0, 0) is near the image centre.
    """

    def __init__(self, rows: int, cols: int, *, scale: float = 1.0, angle: float = 0.0,
                 shift: tuple[float, float] = (0.0, 0.0), work_max: int = WORK_MAX) -> None:
        if rows < 8 or cols < 8:
            raise ValueError(f"image size {rows}x{cols} is too small (8x8 at least)")
        f = min(1.0, work_max / max(rows, cols))
        self.rows, self.cols = rows, cols
        self.h, self.w = max(8, round(rows * f)), max(8, round(cols * f))
        self.aspect = rows / cols
        self.scale, self.shift = scale, shift
        self.c, self.s = math.cos(angle), math.sin(angle)
        xs = ((np.arange(self.w, dtype=np.float32) + 0.5) / self.w - 0.5 - shift[0])[None, :]
        ys = (((np.arange(self.h, dtype=np.float32) + 0.5) / self.h - 0.5) * self.aspect
              - shift[1])[:, None]
        inv = np.float32(1.0 / scale)
        c, s = np.float32(self.c), np.float32(self.s)
        self.ax: Arr = (c * xs + s * ys) * inv
        self.ay: Arr = (c * ys - s * xs) * inv

    def zeros(self) -> Arr:
        return np.zeros((self.h, self.w), dtype=np.float32)

    def region(self, x0: float, y0: float, x1: float, y1: float) -> Slices:
        """Working-grid slices covering the anatomical rectangle (any corner order)."""
        ax = np.array([x0, x1, x0, x1], dtype=np.float64)
        ay = np.array([y0, y0, y1, y1], dtype=np.float64)
        X = self.shift[0] + self.scale * (self.c * ax - self.s * ay)
        Y = self.shift[1] + self.scale * (self.s * ax + self.c * ay)
        px = (X + 0.5) * self.w - 0.5
        py = (Y / self.aspect + 0.5) * self.h - 0.5
        i0 = int(np.clip(math.floor(py.min()) - 1, 0, self.h))
        i1 = int(np.clip(math.ceil(py.max()) + 2, 0, self.h))
        j0 = int(np.clip(math.floor(px.min()) - 1, 0, self.w))
        j1 = int(np.clip(math.ceil(px.max()) + 2, 0, self.w))
        return slice(i0, max(i0, i1)), slice(j0, max(j0, j1))

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        """Working-grid pixel position (x, y) of an anatomical point."""
        X = self.shift[0] + self.scale * (self.c * x - self.s * y)
        Y = self.shift[1] + self.scale * (self.s * x + self.c * y)
        return (X + 0.5) * self.w - 0.5, (Y / self.aspect + 0.5) * self.h - 0.5

    def box(self, mask: npt.NDArray[np.bool_], sl: Slices) -> Box | None:
        """Inclusive full-resolution box around the True pixels of ``mask`` (on ``sl``)."""
        rr = np.flatnonzero(mask.any(axis=1))
        cc = np.flatnonzero(mask.any(axis=0))
        if rr.size == 0 or cc.size == 0:
            return None
        fy, fx = self.rows / self.h, self.cols / self.w
        y0, y1 = sl[0].start + int(rr[0]), sl[0].start + int(rr[-1])
        x0, x1 = sl[1].start + int(cc[0]), sl[1].start + int(cc[-1])
        bx0 = max(0, math.floor(x0 * fx))
        by0 = max(0, math.floor(y0 * fy))
        bx1 = min(self.cols - 1, math.ceil((x1 + 1) * fx) - 1)
        by1 = min(self.rows - 1, math.ceil((y1 + 1) * fy) - 1)
        return bx0, by0, max(bx0, bx1), max(by0, by1)

    def upsample(self, work: Arr) -> Arr:
        """A working-grid array at full size (bilinear)."""
        if (self.h, self.w) == (self.rows, self.cols):
            return work
        resized = Image.fromarray(np.ascontiguousarray(work)).resize(
            (self.cols, self.rows), Image.Resampling.BILINEAR)
        return np.array(resized, dtype=np.float32)

    def finish(self, work: Arr, rng: np.random.Generator, sigma: float) -> Arr:
        """Resize the working image to full size, add quantum noise, clip to [0, 1]."""
        np.clip(work, 0.0, 1.0, out=work)
        img = self.upsample(work)
        raw = np.frombuffer(rng.bytes(self.rows * self.cols), dtype=np.uint8)
        noise = _NOISE_LUT[raw.reshape(self.rows, self.cols)]
        # Quantum noise grows with density (fewer photons reach the detector).
        amp = img * np.float32(0.6 * sigma)
        amp += np.float32(0.4 * sigma)
        noise *= amp
        img += noise
        np.clip(img, 0.0, 1.0, out=img)
        return img


def _child_rngs(rng: np.random.Generator, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=n)]


def _tone(rng: np.random.Generator, g: _Grid, density: Arr) -> Arr:
    """Exposure variation: gain, offset, heel effect and gamma, on the working grid."""
    u = rng.uniform
    gain, offset, gamma = u(0.88, 1.12), u(-0.04, 0.05), u(0.8, 1.25)
    heel = u(-0.06, 0.06)
    img = density * np.float32(gain)
    img += np.float32(offset)
    img += np.float32(heel) * g.ay
    np.clip(img, 0.0, 1.0, out=img)
    img **= np.float32(gamma)
    return img


def _collimate(rng: np.random.Generator, g: _Grid, img: Arr, p: float = 0.2) -> None:
    """Sometimes leave unexposed (white) margins where the collimator blades were."""
    if rng.random() >= p:
        return
    level = np.float32(rng.uniform(0.8, 0.95))
    for edge in range(4):
        if rng.random() < 0.5:
            continue
        frac = rng.uniform(0.01, 0.035)
        n = max(1, round(frac * (g.h if edge < 2 else g.w)))
        target = (img[:n], img[-n:], img[:, :n], img[:, -n:])[edge]
        np.maximum(target, level, out=target)


# ============================================================================ frontal chest


@dataclass
class _Frontal:
    """Intermediate products of a frontal rendering (used by lesions and by tests)."""

    g: _Grid
    density: Arr
    lung: Arr  # lung-field mask 0..1 (after heart/mediastinum overlap)
    lung_sub: Arr  # darkening the lungs applied (an effusion cancels it)
    domes: tuple[tuple[float, float, float], tuple[float, float, float]]  # (d0, dc, k) R, L
    lung_geo: tuple[tuple[float, float, float, float], ...]  # (cx, cy, a, b) R, L
    view: str
    abd_d: float  # soft-tissue density below the domes (an effusion matches it)


def _draw_frontal(rng: np.random.Generator, rows: int, cols: int) -> _Frontal:
    u = rng.uniform
    f32 = np.float32
    view = "AP" if rng.random() < 0.2 else "PA"
    scale = u(0.86, 1.0) * (1.04 if view == "AP" else 1.0)
    g = _Grid(rows, cols, scale=scale, angle=math.radians(u(-3.0, 3.0)),
              shift=(u(-0.03, 0.03), u(-0.035, 0.035)))
    ax, ay = g.ax, g.ay

    # --- body outline and soft tissue (thickness profile of a cylinder)
    neck, hw0 = u(0.08, 0.1), u(0.43, 0.47)
    hw = f32(neck) + f32(hw0 + 0.04 - neck) * _sstep(ay[:, :1], -0.62, -0.42)
    hw -= f32(0.04) * _sstep(ay[:, :1], -0.5, -0.3)
    hw *= f32(1.0) + f32(u(-0.03, 0.04)) * _sstep(ay[:, :1], -0.1, 0.5)
    # (hw varies along ay only; with the small rotation a per-row value is close enough)
    qb = ax / hw
    qb *= qb
    body = _dome(qb)
    D = f32(u(0.44, 0.52)) * body
    if rng.random() < 0.7:  # arms and humeral heads beside the chest wall
        for sgn in (-1.0, 1.0):
            x_top, x_bot = sgn * (hw0 + u(0.04, 0.07)), sgn * (hw0 + u(0.08, 0.12))
            sl = g.region(x_top - 0.09, -0.55, x_bot + 0.09, 0.6)
            if sl[1].stop - sl[1].start < 2:
                continue
            X, Y = ax[sl], ay[sl]
            arm = _dome(_capsule_d2(X, Y, (x_top, -0.44), (x_bot, 0.7)) * f32(1 / 0.065**2))
            hum = _dome(_capsule_d2(X, Y, (x_top - sgn * 0.02, -0.42), (x_bot, 0.7))
                        * f32(1 / 0.022**2))
            fade = _ramp(f32(0.55) - Y, 0.0, 0.5)
            D[sl] += (f32(0.35) * arm * (f32(1.0) - body[sl]) + f32(0.1) * hum) * fade

    # --- central shadow: mediastinum, heart, aortic knob (one silhouette), abdomen
    mcx = u(-0.005, 0.015)
    mw = u(0.075, 0.095)
    dxm = np.abs(ax - f32(mcx))
    mwy = f32(mw) * (f32(0.8) + f32(0.3) * _sstep(ay[:, :1], -0.32, 0.02))
    sil = _sstep(mwy - dxm, -0.015, 0.015)
    d0r = u(0.12, 0.18)
    domes = ((d0r, u(0.17, 0.23), u(0.08, 0.13)),
             (d0r + u(0.0, 0.04), u(0.17, 0.23), u(0.08, 0.13)))
    # the heart sits on the left dome
    ha, hb = u(0.16, 0.19) * (1.1 if view == "AP" else 1.0), u(0.13, 0.155)
    hx, hy, hang = u(0.05, 0.08), domes[1][0] - u(0.0, 0.04), u(-0.5, -0.25)
    sl = g.region(hx - 0.3, hy - 0.3, hx + 0.3, hy + 0.3)
    dx, dy = ax[sl] - f32(hx), ay[sl] - f32(hy)
    ca, sa = f32(math.cos(hang) / ha), f32(math.sin(hang) / ha)
    cb, sb = f32(math.cos(hang) / hb), f32(math.sin(hang) / hb)
    e1, e2 = ca * dx + sa * dy, cb * dy - sb * dx
    qh = e1 * e1 + e2 * e2
    np.maximum(sil[sl], _sstep(1.0 - qh, 0.0, 0.1), out=sil[sl])
    kx, ky, kr = mcx + mw * u(0.75, 0.95), u(-0.27, -0.22), u(0.03, 0.045)
    sl = g.region(kx - kr, ky - kr, kx + kr, ky + kr)
    qk = ((ax[sl] - f32(kx)) ** 2 + (ay[sl] - f32(ky)) ** 2) * f32(1 / (kr * kr))
    np.maximum(sil[sl], _sstep(1.0 - qk, 0.0, 0.2), out=sil[sl])
    left = ax < 0
    sdx = np.where(left, ax + f32(domes[0][1]), ax - f32(domes[1][1]))
    sdx *= sdx
    sdx *= np.where(left, f32(domes[0][2] / 0.17**2), f32(domes[1][2] / 0.17**2))
    dome_all = sdx + np.where(left, f32(domes[0][0]), f32(domes[1][0]))
    abd = _ramp(ay - dome_all, -0.01, 0.004)  # the complement of the lungs' dome cut
    med_d, abd_d = u(0.2, 0.26), u(0.15, 0.21)
    D += np.maximum(f32(med_d) * sil, f32(abd_d) * abd) * body
    trach = _ramp(f32(u(0.012, 0.017)) - dxm, -0.004, 0.004) * _ramp(-ay, 0.17, 0.24)
    D -= f32(u(0.06, 0.1)) * trach
    period, phase = u(0.043, 0.05), u(0.0, 2 * math.pi)
    vert = np.cos(f32(2 * math.pi / period) * ay[:, :1] + f32(phase))  # per row
    spine = _ramp(f32(0.034) - dxm, -0.006, 0.006) * (f32(0.6) + f32(0.4) * _ramp(vert, -0.8, -0.4))
    D += f32(u(0.03, 0.06)) * spine
    if rng.random() < 0.7:  # gastric bubble under the left dome
        gx, gy = u(0.15, 0.25), domes[1][0] + u(0.04, 0.07)
        gr = u(0.03, 0.05)
        sl = g.region(gx - gr, gy - gr, gx + gr, gy + gr)
        qg = ((ax[sl] - f32(gx)) / f32(gr)) ** 2 + ((ay[sl] - f32(gy)) / f32(gr * 0.7)) ** 2
        D[sl] -= f32(u(0.05, 0.12)) * _sstep(1.0 - qg, 0.0, 0.3)

    # --- lungs: rounded apex, widest at the base, cut by the domes; hila and vessels
    lung, lung_sub = g.zeros(), g.zeros()
    depth = u(0.24, 0.32)
    geo: list[tuple[float, float, float, float]] = []
    hila: list[tuple[float, float, float]] = []
    for side, sgn in enumerate((-1.0, 1.0)):
        d0, dc, k = domes[side]
        cxl = u(0.21, 0.235)
        a = min(u(0.17, 0.2), hw0 - 0.03 - cxl)
        cy = d0 - u(0.0, 0.04)
        b = cy - u(-0.44, -0.38)
        geo.append((cxl, cy, a, b))
        x_in, x_out = (0.0, cxl + a + 0.03) if sgn > 0 else (-(cxl + a + 0.03), 0.0)
        sl = g.region(x_in, cy - b - 0.02, x_out, d0 + k * 2.5 + 0.03)
        X, Y = ax[sl] * f32(sgn), ay[sl]
        ey = np.minimum(Y - f32(cy), f32(0.0))
        ey *= f32(-1.0 / b)
        ex = X - f32(cxl)
        ex *= f32(1.0 / a)
        qe = ex * ex
        qe += ey * ey * ey  # blunter apex than an ellipse
        m = _ramp(1.0 - qe, 0.0, 0.1) * _ramp(dome_all[sl] - Y, -0.004, 0.01)
        m *= _ramp(X, 0.0, 0.02)  # this side only
        m *= f32(1.0) - f32(0.92) * sil[sl]
        lung[sl] += m
        sub = m * f32(depth) * (f32(0.55) + f32(0.45) * _dome(qe))
        lung_sub[sl] += sub
        D[sl] -= sub
        hxl, hyl = sgn * u(0.085, 0.11), u(-0.09, -0.04)
        hila.append((hxl, hyl, sgn))
        slh = g.region(hxl - 0.06, hyl - 0.09, hxl + 0.06, hyl + 0.09)
        qh = ((ax[slh] - f32(hxl)) * f32(1 / 0.05)) ** 2
        qh += ((ay[slh] - f32(hyl)) * f32(1 / 0.08)) ** 2
        D[slh] += f32(u(0.08, 0.12)) * _dome(qh, 1.5) * _ramp(lung[slh], 0.0, 0.3)
    vessels = _vessel_layer(rng, g, hila)
    vessels *= f32(u(0.07, 0.1))
    vessels += f32(u(0.01, 0.02)) * _lowres_noise(rng, g.h, g.w, (18, 15))
    vessels *= lung
    D += vessels

    # --- ribs: posterior arcs and fainter anterior ribs, inside the chest wall
    sl = g.region(-0.5, -0.5, 0.5, 0.6)
    X, Y = np.abs(ax[sl]), ay[sl]
    wall = _ramp(f32(1.0) - qb[sl], 0.03, 0.2) * (f32(1.0) - f32(0.7) * abd[sl])
    wall *= f32(0.6) + f32(0.4) * lung[sl] - f32(0.45) * sil[sl]  # faint over the heart
    sp, y0 = u(0.05, 0.06), u(-0.47, -0.43)
    p1, p2 = u(0.5, 0.75), u(2.0, 2.6)
    rr = X - f32(0.03)
    yr = Y - (f32(-p1) + f32(p2) * rr) * rr - f32(y0)
    tp = yr * (f32(1.0 / sp) - f32(0.25 / sp) * yr)  # ribs spread out downwards
    frac = tp - np.floor(tp)
    frac -= f32(0.22)
    frac *= f32(1 / 0.2)
    rib = _dome(frac * frac, 0.25)
    rib *= _ramp(tp, -0.2, 0.2) * _ramp(f32(11.0) - tp, 0.0, 0.8) * _ramp(X, 0.03, 0.1)
    ta = (Y - f32(y0 + 0.03) - f32(0.4) * (f32(0.42) - X)) * f32(1.0 / (sp * 1.15))
    fa = ta - np.floor(ta)
    fa -= f32(0.2)
    fa *= f32(1 / 0.17)
    arib = _dome(fa * fa)
    arib *= _ramp(ta, 0.0, 0.3) * _ramp(f32(6.5) - ta, 0.0, 0.5) * _ramp(X, 0.12, 0.2)
    rib *= f32(u(0.08, 0.13))
    rib += f32(u(0.03, 0.06)) * arib
    rib *= wall
    D[sl] += rib

    # --- clavicles (S-shaped bands, higher and flatter on AP), scapular edges
    ym = u(-0.4, -0.35) - (0.03 if view == "AP" else 0.0)
    rise = u(0.05, 0.1) * (0.5 if view == "AP" else 1.0)
    cd = u(0.09, 0.15)
    for sgn in (-1.0, 1.0):
        xm, xl, th = u(0.02, 0.04), u(0.3, 0.36), u(0.02, 0.027)
        sl = g.region(sgn * (xm - 0.02), ym - rise - 0.06, sgn * (xl + 0.02), ym + 0.06)
        X, Y = ax[sl] * f32(sgn), ay[sl]
        tt = (X - f32(xm)) * f32(1.0 / (xl - xm))
        yc = f32(ym) - f32(rise) * tt + f32(0.012) * np.sin(f32(2 * math.pi) * tt)
        dist = (Y - yc) / (f32(th) * (f32(1.3) - f32(0.3) * tt))
        along = _ramp(tt, -0.04, 0.04) * _ramp(f32(1.03) - tt, 0.0, 0.06)
        D[sl] += f32(cd) * _dome(dist * dist, 0.25) * along
        scx, scy = sgn * u(0.36, 0.41), u(-0.3, -0.24)
        sl = g.region(scx - 0.12, scy - 0.16, scx + 0.12, scy + 0.16)
        qs = ((ax[sl] - f32(scx)) / f32(0.1)) ** 2 + ((ay[sl] - f32(scy)) / f32(0.15)) ** 2
        D[sl] += f32(u(0.02, 0.05)) * _ramp(1.0 - qs, 0.0, 0.15) * body[sl]

    return _Frontal(g, D, lung, lung_sub, domes, (geo[0], geo[1]), view, abd_d)


def _vessel_layer(rng: np.random.Generator, g: _Grid,
                  hila: list[tuple[float, float, float]]) -> Arr:
    """Branching pulmonary vessels: binary trees grown from each hilum, level by level.

    Pillow draws the segments at half the working resolution; the bilinear resize to the
    working grid softens them.
    """
    hw, ww = max(4, g.h // 2), max(4, g.w // 2)
    img = Image.new("L", (ww, hw), 0)
    draw = ImageDraw.Draw(img)
    unit = ww * g.scale  # half-resolution pixels per anatomical unit
    for hx, hy, sgn in hila:
        n = int(rng.integers(5, 8))
        x = np.full(n, hx)
        y = hy + rng.uniform(-0.03, 0.03, n)
        ang = np.linspace(-1.9, 1.6, n)
        length = rng.uniform(0.07, 0.1, n)
        width = rng.uniform(0.009, 0.013, n)
        for _depth in range(5):
            ang = ang + rng.normal(0.0, 0.14, ang.size)
            x1, y1 = x + sgn * length * np.cos(ang), y + length * np.sin(ang)
            X0 = g.shift[0] + g.scale * (g.c * x - g.s * y)
            Y0 = g.shift[1] + g.scale * (g.s * x + g.c * y)
            X1 = g.shift[0] + g.scale * (g.c * x1 - g.s * y1)
            Y1 = g.shift[1] + g.scale * (g.s * x1 + g.c * y1)
            seg = np.stack([(X0 + 0.5) * ww - 0.5, (Y0 / g.aspect + 0.5) * hw - 0.5,
                            (X1 + 0.5) * ww - 0.5, (Y1 / g.aspect + 0.5) * hw - 0.5], axis=1)
            fills = (100 + 1.1e4 * width).astype(int).tolist()
            widths = np.maximum(1, np.rint(width * unit)).astype(int).tolist()
            for (a, b, c, d), f, wd in zip(seg.tolist(), fills, widths, strict=True):
                draw.line([(a, b), (c, d)], fill=f, width=wd)
            # every branch splits in two
            turn = rng.uniform(0.2, 0.5, (2, ang.size)) * np.array([[-1.0], [1.0]])
            ang = (ang + turn).ravel()
            x, y = np.tile(x1, 2), np.tile(y1, 2)
            length = np.tile(length, 2) * rng.uniform(0.62, 0.8, 2 * length.size)
            width = np.tile(width, 2) * 0.7
    out = np.asarray(img.resize((g.w, g.h), Image.Resampling.BILINEAR), dtype=np.float32)
    out *= np.float32(1 / 255)
    return out


# ---------------------------------------------------------------------------- lesions


def _lesion_box(fr: _Frontal, add: Arr, sl: Slices) -> Box | None:
    peak = float(add.max()) if add.size else 0.0
    if peak <= 0.02:
        return None
    return fr.g.box(add > np.float32(0.15 * peak), sl)


def _tb_center(rng: np.random.Generator, fr: _Frontal, side: int) -> tuple[float, float]:
    """A point in the upper zone of one lung (apex excluded)."""
    cxl, cy, a, b = fr.lung_geo[side]
    sgn = -1.0 if side == 0 else 1.0
    t = rng.uniform(0.07, 0.18)  # below the apex
    half = a * math.sqrt(max(0.0, 1.0 - ((t - b) / b) ** 2))
    return sgn * (cxl + rng.uniform(-0.35, 0.35) * half), cy - b + t


def _cavity(rng: np.random.Generator, fr: _Frontal, side: int) -> Box | None:
    g, f32 = fr.g, np.float32
    cx, cy = _tb_center(rng, fr, side)
    R = rng.uniform(0.055, 0.08)
    sl = g.region(cx - 2.6 * R, cy - 3.2 * R, cx + 2.6 * R, cy + 3.2 * R)
    dx, dy = g.ax[sl] - f32(cx), g.ay[sl] - f32(cy)
    rho = np.hypot(dx, dy)
    th = np.arctan2(dy, dx)
    ph = rng.uniform(0, 2 * math.pi, 3)
    Rt = f32(R) * (f32(1.0) + f32(0.12) * np.sin(2 * th + f32(ph[0]))
                   + f32(0.07) * np.sin(3 * th + f32(ph[1])))
    wall = np.exp(-(((rho - f32(0.78) * Rt) / (f32(rng.uniform(0.18, 0.26)) * Rt)) ** 2))
    inner = np.exp(-((rho / (f32(0.6) * Rt)) ** 4))
    haze = _dome((dx / f32(2.4 * R)) ** 2 + (dy / f32(3.0 * R)) ** 2, 1.0)
    haze *= haze  # compact support: nothing beyond the drawing window
    haze *= f32(1.0) - inner
    add = f32(rng.uniform(0.3, 0.42)) * wall + f32(rng.uniform(0.08, 0.14)) * haze
    add -= f32(rng.uniform(0.0, 0.05)) * inner  # air in the cavity
    for _ in range(int(rng.integers(1, 5))):  # satellite nodules
        a, d = rng.uniform(0, 2 * math.pi), R * rng.uniform(1.3, 2.2)
        rn = R * rng.uniform(0.2, 0.35)
        q = (dx - f32(d * math.cos(a))) ** 2 + (dy - f32(1.3 * d * math.sin(a))) ** 2
        q *= f32(1 / (rn * rn))
        add += f32(rng.uniform(0.2, 0.35)) * _dome(q, 0.5)
    add *= fr.lung[sl]
    fr.density[sl] += add
    return _lesion_box(fr, add, sl)


def _nodules(rng: np.random.Generator, fr: _Frontal, side: int) -> Box | None:
    g, f32 = fr.g, np.float32
    cx, cy = _tb_center(rng, fr, side)
    Rc = rng.uniform(0.075, 0.1)
    sx, sy = rng.uniform(0.9, 1.2), rng.uniform(1.1, 1.4)  # clusters run along the lung
    m = 1.8 * Rc * max(sx, sy) + 0.01
    sl = g.region(cx - m, cy - m, cx + m, cy + m)
    dx, dy = g.ax[sl] - f32(cx), g.ay[sl] - f32(cy)
    haze = _dome(((dx / f32(sx)) ** 2 + (dy / f32(sy)) ** 2) * f32(1 / (1.8 * Rc) ** 2), 1.0)
    add = f32(rng.uniform(0.06, 0.12)) * haze * haze
    for _ in range(int(rng.integers(7, 15))):
        a, r = rng.uniform(0, 2 * math.pi), Rc * rng.uniform(0.0, 1.0) ** 0.4
        nx, ny = r * math.cos(a) * sx, r * math.sin(a) * sy
        rn = rng.uniform(0.011, 0.022)
        q = ((dx - f32(nx)) ** 2 + (dy - f32(ny)) ** 2) / f32(rn * rn)
        add += f32(rng.uniform(0.25, 0.4)) * _dome(q, 0.5)
    add *= fr.lung[sl]
    fr.density[sl] += add
    return _lesion_box(fr, add, sl)


def _consolidation(rng: np.random.Generator, fr: _Frontal, side: int) -> Box | None:
    g, f32 = fr.g, np.float32
    cxl, _, a, _ = fr.lung_geo[side]
    d0 = fr.domes[side][0]
    sgn = -1.0 if side == 0 else 1.0
    cx = sgn * (cxl + rng.uniform(-0.25, 0.35) * a)
    cy = rng.uniform(d0 - 0.13, d0 - 0.04)
    sl = g.region(cx - 0.2, cy - 0.2, cx + 0.2, cy + 0.2)
    dx, dy = g.ax[sl] - f32(cx), g.ay[sl] - f32(cy)
    field = np.zeros_like(dx)
    for _ in range(int(rng.integers(3, 7))):
        ox, oy = rng.normal(0.0, 0.045), rng.normal(0.0, 0.03)
        s = rng.uniform(0.045, 0.065)
        field += np.exp(-((dx - f32(ox)) ** 2 + (dy - f32(oy)) ** 2) / f32(2 * s * s))
    blob = _sstep(field, 0.3, 1.0)
    tex = _lowres_noise(rng, blob.shape[0], blob.shape[1], (7, 7)) if blob.size else blob
    add = f32(rng.uniform(0.28, 0.4)) * blob * (f32(0.9) + f32(0.1) * tex)
    add *= fr.lung[sl]
    fr.density[sl] += add
    return _lesion_box(fr, add, sl)


def _effusion(rng: np.random.Generator, fr: _Frontal, side: int) -> Box | None:
    g, f32 = fr.g, np.float32
    cxl, _, a, _ = fr.lung_geo[side]
    d0, _, k = fr.domes[side]
    sgn = -1.0 if side == 0 else 1.0
    level = d0 - rng.uniform(0.07, 0.17)  # top of the meniscus at the lateral wall
    r_lat = cxl + a
    curv = rng.uniform(1.5, 2.5)
    sl = g.region(0.0, level - 0.03, sgn * (r_lat + 0.03), d0 + 2.5 * k + 0.03)
    X, Y = g.ax[sl] * f32(sgn), g.ay[sl]
    men = f32(level) + f32(curv) * (f32(r_lat) - X) ** 2
    fluid = _sstep(Y - men, -0.004, 0.014) * _sstep(X, 0.0, 0.02)
    add = fluid * (fr.lung_sub[sl] + f32(fr.abd_d * rng.uniform(0.9, 1.1)) * fr.lung[sl])
    fr.density[sl] += add
    return _lesion_box(fr, add, sl)


def _lesions(rng: np.random.Generator, fr: _Frontal, label: str) -> tuple[Box, ...]:
    boxes: list[Box] = []
    if label == "NORM":
        return ()
    side = int(rng.integers(0, 2))
    if label == "TB":
        kinds = [_cavity if rng.random() < 0.45 else _nodules]
        if rng.random() < 0.3:
            kinds.append(_cavity if rng.random() < 0.3 else _nodules)
    else:
        first = _consolidation if rng.random() < 0.55 else _effusion
        kinds = [first]
        if rng.random() < (0.2 if first is _effusion else 0.1):
            kinds.append(first)
    for i, fn in enumerate(kinds):
        box = fn(rng, fr, side if i == 0 else 1 - side)
        if box is not None:
            boxes.append(box)
    return tuple(boxes)


def _lung_masks(fr: _Frontal) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(left, right) lung fields at full size; the patient's left is at ``ax > 0``."""
    left = fr.g.ax > 0
    return (fr.g.upsample(np.where(left, fr.lung, np.float32(0.0))) >= 0.5,
            fr.g.upsample(np.where(left, np.float32(0.0), fr.lung)) >= 0.5)


def _no_lungs(rows: int, cols: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    return np.zeros((rows, cols), dtype=bool), np.zeros((rows, cols), dtype=bool)


def _render_frontal(rng: np.random.Generator, label: str, rows: int, cols: int,
                    masks: bool = False) -> tuple[Phantom, Box]:
    """A frontal phantom and the (inclusive) box of its lung fields."""
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, got {label!r}")
    r_anat, r_les, r_noise = _child_rngs(rng, 3)
    fr = _draw_frontal(r_anat, rows, cols)
    boxes = _lesions(r_les, fr, label)
    if label != "NORM" and not boxes:  # the lesion fell outside the image: draw again
        boxes = _lesions(r_les, fr, label)
    if label != "NORM" and not boxes:
        raise RuntimeError(f"could not place a {label} lesion on a {rows}x{cols} image")
    img = _tone(r_anat, fr.g, fr.density)
    _collimate(r_anat, fr.g, img)
    full = fr.g.finish(img, r_noise, r_anat.uniform(0.008, 0.02))
    lung_box = fr.g.box(fr.lung > 0.5, (slice(0, fr.g.h), slice(0, fr.g.w)))
    assert lung_box is not None
    lungs = _lung_masks(fr) if masks else None
    return Phantom(full, label, boxes, fr.view, "CHEST", lungs), lung_box


def make_phantom(rng: np.random.Generator, label: str, rows: int = 2500,
                 cols: int = 2048, *, masks: bool = False) -> Phantom:
    """A frontal (PA or AP) chest phantom of class ``label`` ("TB", "NTB" or "NORM").

    The same generator state gives the same anatomy, positioning and noise for every
    label; only the lesions differ. ``masks`` adds the lung-field masks (``lungs``).
    """
    return _render_frontal(rng, label, rows, cols, masks)[0]


# ============================================================================ lateral chest


def make_lateral(rng: np.random.Generator, rows: int = 2500, cols: int = 2048) -> Phantom:
    """A plausible left-lateral chest (patient facing image left): label "NORM", view "LL"."""
    r_anat, r_noise = _child_rngs(rng, 2)
    u = r_anat.uniform
    f32 = np.float32
    g = _Grid(rows, cols, scale=u(0.86, 1.0), angle=math.radians(u(-4.0, 4.0)),
              shift=(u(-0.03, 0.03), u(-0.035, 0.035)))
    ax, ay = g.ax, g.ay
    # body: anterior (left) and posterior (right) skin lines; neck and raised arms on top
    front = f32(-u(0.3, 0.35)) + f32(0.12) * _sstep(-ay, 0.35, 0.6)
    back = f32(u(0.34, 0.4)) - f32(0.1) * _sstep(-ay, 0.4, 0.62)
    mid, half = (front + back) * f32(0.5), (back - front) * f32(0.5)
    qb = (ax - mid) / half
    qb *= qb
    body = _dome(qb)
    D = f32(u(0.55, 0.62)) * body
    # lungs (both superimposed): one large field above the domes, behind the sternum
    d0, k, xt = u(0.12, 0.18), u(0.8, 1.2), u(-0.12, -0.04)
    dome = f32(d0) + f32(k) * (ax - f32(xt)) ** 2
    dome2 = dome + f32(u(0.01, 0.04))  # the second hemidiaphragm, a little lower
    cx, cy, a, b = u(0.0, 0.04), d0, u(0.26, 0.3), d0 + u(0.38, 0.44)
    ex = (ax - f32(cx)) * f32(1 / a)
    ey = np.minimum(ay - f32(cy), f32(0.0)) * f32(1 / b)
    qe = ex * ex + ey * ey
    lung = _ramp(1.0 - qe, 0.0, 0.1) * _ramp(dome2 - ay, -0.004, 0.012)
    # heart: anterior and inferior, on the domes
    hx, hy, ha, hb = u(-0.14, -0.08), d0 - u(0.0, 0.03), u(0.15, 0.18), u(0.13, 0.16)
    qh = ((ax - f32(hx)) / f32(ha)) ** 2 + ((ay - f32(hy)) / f32(hb)) ** 2
    heart = _sstep(1.0 - qh, 0.0, 0.15)
    lung *= f32(1.0) - f32(0.85) * heart
    D -= f32(u(0.26, 0.34)) * lung * (f32(0.6) + f32(0.4) * _dome(qe))
    abd = _ramp(ay - dome, -0.01, 0.01)
    abd_d = u(0.1, 0.16)
    D += np.maximum(f32(abd_d) * abd, f32(abd_d * 0.8) * heart) * body
    # spine: vertebral bodies along a kyphotic curve, posterior elements behind
    xs = f32(u(0.2, 0.25)) + f32(u(0.04, 0.08)) * (ay - f32(-0.1)) ** 2
    period, phase = u(0.045, 0.052), u(0.0, 2 * math.pi)
    vert = np.cos(f32(2 * math.pi / period) * ay + f32(phase))
    dxs = np.abs(ax - xs)
    bodies = _ramp(f32(0.042) - dxs, -0.004, 0.004) * _ramp(vert, -0.75, -0.45)
    D += f32(u(0.07, 0.11)) * bodies
    D += f32(0.04) * _ramp(f32(0.04) - np.abs(ax - xs - f32(0.08)), 0.0, 0.02)
    # sternum, trachea, ribs (oblique posterior bands), humeri of the raised arms
    st = front + f32(0.035)
    D += f32(u(0.08, 0.12)) * _ramp(f32(0.014) - np.abs(ax - st), 0.0, 0.006) * \
        _ramp(ay - f32(-0.36), 0.0, 0.02) * _ramp(f32(0.06) - ay, 0.0, 0.02)
    tx = f32(u(-0.04, 0.0)) + f32(0.15) * (ay - f32(-0.6))
    D -= f32(u(0.06, 0.1)) * _ramp(f32(0.018) - np.abs(ax - tx), 0.0, 0.006) * \
        _ramp(f32(-0.12) - ay, 0.0, 0.03)
    sp = u(0.05, 0.06)
    tr = (ay - f32(0.35) * ax) * f32(1 / sp)
    fr = tr - np.floor(tr)
    fr -= f32(0.25)
    fr *= f32(1 / 0.2)
    D += f32(u(0.04, 0.07)) * _dome(fr * fr) * _ramp(ax, -0.05, 0.15) * lung
    for _ in range(2):
        p0 = (u(-0.3, -0.1), -0.7)
        p1 = (u(0.0, 0.15), u(-0.35, -0.25))
        sl = g.region(min(p0[0], p1[0]) - 0.05, -0.75, max(p0[0], p1[0]) + 0.05, p1[1] + 0.05)
        d2 = _capsule_d2(ax[sl], ay[sl], p0, p1)
        D[sl] += f32(0.05) * _dome(d2 * f32(1 / 0.03**2)) + f32(0.1) * _dome(d2 * f32(1 / 0.07**2))
    D += f32(0.015) * _lowres_noise(r_anat, g.h, g.w, (18, 15)) * lung
    img = _tone(r_anat, g, D)
    _collimate(r_anat, g, img)
    full = g.finish(img, r_noise, r_anat.uniform(0.008, 0.02))
    return Phantom(full, "NORM", (), "LL", "CHEST")


# ============================================================================ non-chest


def _bone(d2: Arr, r: float, amp: float) -> Arr:
    """Projection of a tubular bone of radius ``r``: bright cortex, darker medulla."""
    outer = _dome(d2 * np.float32(1 / (r * r)))
    inner = _dome(d2 * np.float32(1 / (0.55 * r) ** 2))
    return np.float32(amp) * (outer - np.float32(0.45) * inner)


def _draw_hand(rng: np.random.Generator, g: _Grid) -> Arr:
    u = rng.uniform
    f32 = np.float32
    D, soft = g.zeros(), g.zeros()
    mirror = -1.0 if rng.random() < 0.5 else 1.0  # left or right hand (thumb side)
    ax, ay = g.ax * f32(mirror), g.ay

    def add(p0: tuple[float, float], p1: tuple[float, float], r_bone: float,
            r_soft: float) -> None:
        xs = (p0[0], p1[0])
        ys = (p0[1], p1[1])
        m = max(r_soft, r_bone)
        sl = g.region(mirror * (min(xs) - m), min(ys) - m, mirror * (max(xs) + m), max(ys) + m)
        if sl[0].stop <= sl[0].start or sl[1].stop <= sl[1].start:
            return
        d2 = _capsule_d2(ax[sl], ay[sl], p0, p1)
        if r_soft > 0:
            np.maximum(soft[sl], _dome(d2 * f32(1 / r_soft**2)), out=soft[sl])
        if r_bone > 0:
            np.maximum(D[sl], _bone(d2, r_bone, u(0.3, 0.36)), out=D[sl])

    # forearm (radius, ulna), carpals, metacarpals, phalanges, thumb
    wy = u(0.22, 0.28)
    add((-0.05, 0.8), (-0.06, wy + 0.07), 0.034, 0.0)
    add((0.07, 0.8), (0.07, wy + 0.07), 0.027, 0.0)
    add((0.0, 0.85), (0.0, wy), 0.0, 0.18)
    for i in range(8):
        cx, cy = -0.09 + 0.055 * (i % 4) + u(-0.006, 0.006), wy - 0.005 - 0.05 * (i // 4)
        add((cx, cy), (cx + 0.006, cy - 0.012), 0.022, 0.0)
    add((-0.0, wy - 0.08), (0.0, wy - 0.2), 0.0, 0.155)  # palm
    spread = u(0.06, 0.14)
    for f in range(4):
        ang = -math.pi / 2 + (f - 1.5) * spread
        x, y = -0.08 + 0.055 * f, wy - 0.1
        for j, (ln, rb) in enumerate(((0.17, 0.018), (0.1, 0.016), (0.06, 0.014), (0.045, 0.012))):
            ln *= u(0.92, 1.08) * (1.08 if f == 1 else 1.0)
            x1, y1 = x + ln * math.cos(ang), y + ln * math.sin(ang)
            add((x, y), (x1, y1), rb, 0.034 if j else 0.0)
            x, y = x1 + 0.013 * math.cos(ang), y1 + 0.013 * math.sin(ang)
    x, y, ang = -0.11, wy - 0.06, -math.pi / 2 - u(0.6, 0.85)
    for ln, rb in ((0.1, 0.019), (0.07, 0.016), (0.05, 0.014)):
        x1, y1 = x + ln * math.cos(ang), y + ln * math.sin(ang)
        add((x, y), (x1, y1), rb, 0.038)
        x, y = x1 + 0.013 * math.cos(ang), y1 + 0.013 * math.sin(ang)
        ang += 0.12
    return D + f32(u(0.3, 0.4)) * soft


def _draw_knee(rng: np.random.Generator, g: _Grid) -> Arr:
    u = rng.uniform
    f32 = np.float32
    ax, ay = g.ax, g.ay
    leg = (ax / f32(u(0.28, 0.34))) ** 2
    D = f32(u(0.4, 0.48)) * _dome(leg)
    jy = u(-0.05, 0.05)  # joint line
    fem = _bone(_capsule_d2(ax, ay, (0.0, -0.9), (0.0, jy - 0.16)), u(0.065, 0.08), 0.3)
    cond = np.maximum(
        _bone(_capsule_d2(ax, ay, (-0.07, jy - 0.13), (-0.075, jy - 0.06)), 0.075, 0.3),
        _bone(_capsule_d2(ax, ay, (0.07, jy - 0.13), (0.075, jy - 0.06)), 0.075, 0.3))
    tib_plateau = _bone(_capsule_d2(ax, ay, (-0.1, jy + 0.09), (0.1, jy + 0.09)), 0.06, 0.3)
    tib = _bone(_capsule_d2(ax, ay, (0.0, jy + 0.1), (0.0, 0.9)), u(0.06, 0.07), 0.3)
    fib = _bone(_capsule_d2(ax, ay, (0.15, jy + 0.12), (0.13, 0.9)), 0.022, 0.25)
    pat = _dome((ax / f32(0.06)) ** 2 + ((ay - f32(jy - 0.15)) / f32(0.075)) ** 2)
    bones = np.maximum(np.maximum(fem, cond), np.maximum(np.maximum(tib, tib_plateau), fib))
    return D + bones + f32(0.08) * pat


def make_non_chest(rng: np.random.Generator, rows: int = 1024, cols: int = 1024, *,
                   masks: bool = False) -> Phantom:
    """A hand- or knee-like radiograph (body part "HAND" or "KNEE", view ""); ``masks``
    adds its (empty) lung-field masks."""
    part = "HAND" if rng.random() < 0.5 else "KNEE"
    return _non_chest(rng, part, rows, cols, masks)


def _non_chest(rng: np.random.Generator, part: str, rows: int, cols: int,
               masks: bool = False) -> Phantom:
    r_anat, r_noise = _child_rngs(rng, 2)
    u = r_anat.uniform
    g = _Grid(rows, cols, scale=u(0.85, 1.05), angle=math.radians(u(-12.0, 12.0)),
              shift=(u(-0.05, 0.05), u(-0.05, 0.05)))
    if part == "HAND":
        g = _Grid(rows, cols, scale=u(1.05, 1.3), angle=math.radians(u(-12.0, 12.0)),
                  shift=(u(-0.05, 0.05), u(0.0, 0.1)))
        D = _draw_hand(r_anat, g)
    elif part == "KNEE":
        D = _draw_knee(r_anat, g)
    else:
        raise ValueError(f"unknown non-chest body part {part!r}")
    D += np.float32(0.04)
    img = _tone(r_anat, g, D)
    _collimate(r_anat, g, img, p=0.5)
    full = g.finish(img, r_noise, r_anat.uniform(0.008, 0.02))
    return Phantom(full, "NORM", (), "", part, _no_lungs(rows, cols) if masks else None)


# ============================================================================ PNG


def _quantize(image: np.ndarray, maxval: int) -> npt.NDArray[np.uint16]:
    scaled = np.asarray(image, dtype=np.float32) * np.float32(maxval)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, maxval, out=scaled)
    return scaled.astype(np.uint16)


def write_png(ph: Phantom, path: Path, bits: int = 8) -> None:
    """Write the phantom as an 8-bit (mode L) or 16-bit greyscale PNG, white = dense."""
    path = Path(path)
    if bits == 8:
        img = Image.fromarray(_quantize(ph.image, 255).astype(np.uint8))
    elif bits == 16:
        img = Image.fromarray(_quantize(ph.image, 65535))
    else:
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", compress_level=1)  # 3x faster than the default, ~15% larger


def write_lung_masks(ph: Phantom, out_dir: Path, rel: str) -> tuple[str, str]:
    """Write ``ph.lungs`` as ``masks/<rel without suffix>_{left,right}.png`` under
    ``out_dir`` (8-bit, 255 = lung, as the public sets write them); returns the two paths
    relative to ``out_dir``, or ``("", "")`` when the phantom has no masks (a lateral)."""
    if ph.lungs is None:
        return "", ""
    stem = Path("masks") / Path(rel).with_suffix("")
    names: list[str] = []
    for side, mask in zip(("left", "right"), ph.lungs, strict=True):
        name = f"{stem.as_posix()}_{side}.png"
        path = Path(out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * np.uint8(255)).save(path, format="PNG")
        names.append(name)
    return names[0], names[1]


# ============================================================================ DICOM

_FIRST_F = ("JANE", "MARY", "ANNA", "LINDA", "SARAH", "FATIMA", "AMINA", "GRACE", "MARIA",
            "AISHA", "LUCY", "ROSE", "ELENA", "PRIYA", "MEI", "NADIA", "ZAINAB", "ESTHER")
_FIRST_M = ("JOHN", "JAMES", "PETER", "DAVID", "AHMED", "JOSEPH", "SAMUEL", "MOHAMED",
            "CARLOS", "RAVI", "WEI", "IVAN", "DANIEL", "PAUL", "MOSES", "OMAR", "LUIS", "TOM")
_LAST = ("DOE", "SMITH", "OKAFOR", "MWANGI", "NGUYEN", "GARCIA", "KHAN", "PATEL", "MULLER",
         "ROSSI", "SILVA", "KOWALSKI", "ODHIAMBO", "BANDA", "TANAKA", "IVANOV", "HASSAN",
         "MENSAH", "PHIRI", "MOYO", "NDLOVU", "LOPEZ", "CHEN", "WANJIRU", "BROWN", "DIALLO")
_DOCTORS = ("HOUSE^GREGORY", "GREY^MEREDITH", "ROSS^DOUG", "KILDARE^JAMES", "QUINN^MICHAELA",
            "WELBY^MARCUS", "MENSAH^KOFI", "ADEYEMI^NGOZI", "")
_CHEST_DESCRIPTIONS = ("XR CHEST PA", "XR CHEST 1 VIEW", "XR CHEST PA AND LATERAL",
                       "CHEST X-RAY", "THORAX PA", "XR CHEST AP PORTABLE", "TB SCREENING CXR")
_ANATOMY_CODES = {  # CID 4031 Common Anatomic Regions (SNOMED CT)
    "CHEST": ("43799004", "Chest"),
    "HAND": ("85562004", "Hand"),
    "KNEE": ("72696002", "Knee"),
}
_ORIENTATION = {"PA": ["L", "F"], "AP": ["L", "F"], "LL": ["P", "F"],  # by view, chest
                "HAND": ["L", "H"], "KNEE": ["L", "F"]}  # by body part, non-chest
_VIEW_CODES = {  # CID 4010 DX View (SNOMED CT)
    "PA": ("272479007", "postero-anterior"),
    "AP": ("399348003", "antero-posterior"),
    "LL": ("399173006", "left lateral"),
}


def _uid(rng: np.random.Generator) -> str:
    """A UID that is a function of the generator state (reproducible data sets)."""
    return str(generate_uid(entropy_srcs=[str(int(rng.integers(0, 2**63 - 1)))]))


def _date(rng: np.random.Generator, first: int, last: int) -> str:
    start = np.datetime64(f"{first}-01-01")
    days = int((np.datetime64(f"{last}-12-31") - start).astype(int))
    return str(start + np.timedelta64(int(rng.integers(0, days + 1)), "D")).replace("-", "")


def random_patient_study(rng: np.random.Generator) -> PatientStudy:
    """Realistic fake patient and chest-study attributes (reproducible from ``rng``)."""
    sex = "F" if rng.random() < 0.48 else ("M" if rng.random() < 0.98 else "O")
    first = rng.choice(_FIRST_F if sex == "F" else _FIRST_M if sex == "M" else _FIRST_F + _FIRST_M)
    name = f"{rng.choice(_LAST)}^{first}"
    study_date = _date(rng, 2019, 2025)
    return PatientStudy(
        patient_name=name,
        patient_id=f"{int(rng.integers(10**7, 10**8))}",
        birth_date=_date(rng, 1935, 2012),
        sex=sex,
        study_instance_uid=_uid(rng),
        accession_number=f"A{int(rng.integers(10**9, 10**10))}",
        study_date=study_date,
        study_time=f"{int(rng.integers(7, 21)):02d}{int(rng.integers(0, 60)):02d}"
                   f"{int(rng.integers(0, 60)):02d}",
        study_description=str(rng.choice(_CHEST_DESCRIPTIONS)),
        referring_physician=str(rng.choice(_DOCTORS)),
    )


def _age(birth: str, on: str) -> str:
    try:
        years = int(on[:4]) - int(birth[:4]) - (1 if on[4:8] < birth[4:8] else 0)
    except ValueError:
        return ""
    return f"{max(0, min(years, 999)):03d}Y"


def _check_options(opts: DicomOptions) -> None:
    if opts.modality not in ("CR", "DX"):
        raise ValueError(f"modality must be CR or DX, got {opts.modality!r}")
    if opts.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(
            f"photometric must be MONOCHROME1 or MONOCHROME2, got {opts.photometric!r}")
    if opts.bits_stored not in (12, 16):
        raise ValueError(f"bits_stored must be 12 or 16, got {opts.bits_stored}")
    if opts.presentation_intent not in ("FOR PRESENTATION", "FOR PROCESSING"):
        raise ValueError(f"presentation_intent must be FOR PRESENTATION or FOR PROCESSING, "
                         f"got {opts.presentation_intent!r}")
    if opts.transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        name = UID(opts.transfer_syntax).name if opts.transfer_syntax else "(empty)"
        raise ValueError(
            f"transfer syntax {opts.transfer_syntax} ({name}) is not supported; use one of "
            + ", ".join(f"{UID(t).name}" for t in SUPPORTED_TRANSFER_SYNTAXES))


def _code_item(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    return item


def to_dataset(ph: Phantom, study: PatientStudy, opts: DicomOptions = DicomOptions(), *,
               series_number: int = 1, instance_number: int = 1,
               series_instance_uid: str | None = None,
               sop_instance_uid: str | None = None) -> Dataset:
    """A complete CR or DX image data set (with file meta) for ``ph``.

    Stored values are ``image * (2**bits_stored - 1)`` (inverted for MONOCHROME1); the
    window, when written, spans the stored values present, so the display pipeline
    (window, then MONOCHROME1 inversion) shows dense structures white.
    """
    _check_options(opts)
    dx = opts.modality == "DX"
    processing = dx and opts.presentation_intent == "FOR PROCESSING"
    sop_class = (DX_PROCESSING_STORAGE if processing else DX_PRESENTATION_STORAGE) if dx \
        else CR_IMAGE_STORAGE
    sop_uid = sop_instance_uid or str(generate_uid())
    series_uid = series_instance_uid or str(generate_uid())
    rows, cols = ph.image.shape
    maxval = (1 << opts.bits_stored) - 1
    stored = _quantize(ph.image, maxval)
    mono1 = opts.photometric == "MONOCHROME1"
    if mono1:
        stored = np.uint16(maxval) - stored
    chest = ph.body_part == "CHEST"
    paired = not chest
    laterality = ("L" if int(sop_uid.replace(".", "")[-1]) % 2 else "R") if paired else ""

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(opts.transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CXRD_PHANTOM"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.Modality = opts.modality
    ds.Manufacturer = "CXRD"
    ds.InstitutionName = "Phantom General Hospital"
    ds.ReferringPhysicianName = study.referring_physician
    ds.StationName = f"{opts.modality}ROOM1"
    ds.StudyDescription = study.study_description
    view = ph.view or ""
    ds.SeriesDescription = f"{ph.body_part} {view}".strip()
    ds.ManufacturerModelName = "Synthetic Phantom"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    age = _age(study.birth_date, study.study_date)
    if age:
        ds.PatientAge = age
    ds.BodyPartExamined = ph.body_part
    ds.KVP = "120" if chest else "60"
    ds.DeviceSerialNumber = "PH0001"
    ds.SoftwareVersions = "cxrd-phantoms 1"
    ds.ViewPosition = view
    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.accession_number[-8:]
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = _ORIENTATION.get(view if chest else ph.body_part, "")
    if paired and not dx:
        ds.Laterality = laterality
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = opts.photometric
    ds.Rows = rows
    ds.Columns = cols
    spacing = [f"{0.15 * 2048 / max(cols, 1):.6g}"] * 2 if chest else ["0.1", "0.1"]
    ds.PixelSpacing = spacing
    ds.ImagerPixelSpacing = spacing
    ds.BitsAllocated = 16
    ds.BitsStored = opts.bits_stored
    ds.HighBit = opts.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    if opts.window and not processing:  # DX: a window only on For Presentation images
        lo, hi = int(stored.min()), int(stored.max())
        ds.WindowCenter = f"{(lo + hi + 1) / 2:g}"
        ds.WindowWidth = f"{max(hi - lo + 1, 2)}"
        ds.WindowCenterWidthExplanation = "PHANTOM FULL RANGE"
    if dx:
        ds.PresentationIntentType = opts.presentation_intent
        ds.PresentationLUTShape = "INVERSE" if mono1 else "IDENTITY"
        ds.PixelIntensityRelationship = "LIN"
        # +1: lower values = less X-ray intensity at the detector = MONOCHROME1 here
        ds.PixelIntensityRelationshipSign = 1 if mono1 else -1
        ds.PositionerType = ""
        if view in _VIEW_CODES:
            ds.ViewCodeSequence = DicomSequence([_code_item(*_VIEW_CODES[view])])
        ds.ImageLaterality = laterality or "U"
        code = _ANATOMY_CODES.get(ph.body_part)
        if code is not None:
            ds.AnatomicRegionSequence = DicomSequence([_code_item(*code)])
        ds.AcquisitionContextSequence = DicomSequence([])
        ds.DetectorType = "SCINTILLATOR"
        ds.DetectorConfiguration = "AREA"
    ds.PixelData = stored.astype("<u2", copy=False).tobytes()

    ts = UID(opts.transfer_syntax)
    if ts in _COMPRESSED:
        from pydicom.pixels import get_encoder

        encoder = get_encoder(ts)
        if not encoder.is_available:
            raise RuntimeError(
                f"cannot write {ts.name} ({ts}): no pixel data encoder is available "
                f"(missing: {'; '.join(encoder.missing_dependencies) or 'unknown'})")
        try:
            ds.compress(ts, stored, generate_instance_uid=False)
        except Exception as exc:  # the plugins raise many types
            raise RuntimeError(f"cannot write {ts.name} ({ts}): {exc}") from exc
    return ds


def write_dicom(ph: Phantom, path: Path, study: PatientStudy,
                opts: DicomOptions = DicomOptions(), **kw: Any) -> Dataset:
    """:func:`to_dataset` and save it as a DICOM Part 10 file; returns the data set."""
    ds = to_dataset(ph, study, opts, **kw)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


# ============================================================================ data sets


def _random_options(rng: np.random.Generator) -> DicomOptions:
    return DicomOptions(
        modality="CR" if rng.random() < 0.5 else "DX",
        photometric="MONOCHROME1" if rng.random() < 0.4 else "MONOCHROME2",
        bits_stored=12 if rng.random() < 0.5 else 16,
    )


def _random_size(rng: np.random.Generator) -> tuple[int, int]:
    cols = int(rng.integers(1600, 2601)) // 2 * 2
    return int(round(cols * rng.uniform(0.9, 1.3))) // 2 * 2, cols


def _boxes_json(boxes: Iterable[Sequence[int]]) -> str:
    return json.dumps([[int(v) for v in b] for b in boxes], separators=(",", ":"))


def _write_ground_truth(out_dir: Path, rows: Sequence[GroundTruth]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "ground_truth.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(GT_COLUMNS)
        for r in rows:
            w.writerow([r.path, r.label, _boxes_json(r.boxes), r.rows, r.cols, r.view,
                        r.body_part, r.study_instance_uid, r.sop_instance_uid, r.left_mask,
                        r.right_mask])


def read_ground_truth(path: Path) -> list[GroundTruth]:
    """Read a ``ground_truth.csv`` written by :func:`generate_images`/:func:`generate_studies`."""
    out: list[GroundTruth] = []
    with Path(path).open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            boxes = tuple(tuple(int(v) for v in b) for b in json.loads(row.get("boxes") or "[]"))
            out.append(GroundTruth(
                path=row["path"],
                label=row["label"],
                boxes=boxes,  # type: ignore[arg-type]
                rows=int(row["rows"]),
                cols=int(row["cols"]),
                view=row.get("view", ""),
                body_part=row.get("body_part", ""),
                study_instance_uid=row.get("study_instance_uid", ""),
                sop_instance_uid=row.get("sop_instance_uid", ""),
                left_mask=row.get("left_mask") or "",
                right_mask=row.get("right_mask") or "",
            ))
    return out


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="img")


def generate_images(out_dir: Path, n: int, seed: int, *, fmt: str = "png",
                    size: tuple[int, int] | None = None, classes: Sequence[str] = CLASSES,
                    dicom: DicomOptions | None = None, progress: bool = False,
                    masks: bool = False) -> list[GroundTruth]:
    """Write ``n`` frontal chest phantoms and ``ground_truth.csv`` under ``out_dir``.

    Classes are balanced (round robin over ``classes``, then shuffled). Files are
    ``<label>/<label>_<i:05d>.png|.dcm``. ``size`` is ``(rows, cols)``; without it each
    image gets a random detector-like size (cols 1600-2600, rows 0.9-1.3 x cols). With
    ``fmt="dcm"`` each image is its own study, and modality (CR/DX), photometric
    interpretation and bits stored vary unless ``dicom`` fixes them. The output is a
    function of ``seed`` (UIDs included). ``masks`` writes each image's lung-field masks
    (:func:`write_lung_masks`) and names them in the CSV; the images stay the same.
    """
    if fmt not in ("png", "dcm"):
        raise ValueError(f"fmt must be 'png' or 'dcm', got {fmt!r}")
    classes = tuple(classes)
    if not classes or any(c not in CLASSES for c in classes):
        raise ValueError(f"classes must be a non-empty subset of {CLASSES}, got {classes}")
    if n < 0:
        raise ValueError("n must be >= 0")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    labels = [classes[i % len(classes)] for i in range(n)]
    labels = [labels[i] for i in rng.permutation(n)]
    seeds = rng.integers(0, 2**63 - 1, size=n)
    rows_out: list[GroundTruth] = []
    with _progress(n, progress, "phantoms") as bar:
        for i, (label, s) in enumerate(zip(labels, seeds, strict=True)):
            r = np.random.default_rng(int(s))
            r_size, r_img, r_dcm = _child_rngs(r, 3)
            rows, cols = size if size is not None else _random_size(r_size)
            ph = make_phantom(r_img, label, rows, cols, masks=masks)
            rel = f"{label}/{label}_{i:05d}.{fmt}"
            study_uid = sop_uid = ""
            if fmt == "png":
                write_png(ph, out_dir / rel)
            else:
                study = random_patient_study(r_dcm)
                opts = dicom if dicom is not None else _random_options(r_dcm)
                series_uid, sop_uid = _uid(r_dcm), _uid(r_dcm)
                write_dicom(ph, out_dir / rel, study, opts, series_instance_uid=series_uid,
                            sop_instance_uid=sop_uid)
                study_uid = study.study_instance_uid
            rows_out.append(GroundTruth(rel, label, ph.boxes, rows, cols, ph.view,
                                        ph.body_part, study_uid, sop_uid,
                                        *write_lung_masks(ph, out_dir, rel)))
            bar.update(1)
    _write_ground_truth(out_dir, rows_out)
    return rows_out


_NON_CHEST_DESCRIPTIONS = {"HAND": "XR HAND 2 VIEWS", "KNEE": "XR KNEE AP AND LATERAL"}


def generate_studies(out_dir: Path, n_studies: int, seed: int, *,
                     images_per_study: tuple[int, int] = (1, 3), include_lateral: bool = True,
                     include_non_chest: bool = True, size: tuple[int, int] | None = None,
                     dicom: DicomOptions | None = None, progress: bool = False,
                     masks: bool = False) -> list[GroundTruth]:
    """Write DICOM studies ``<study_uid>/<sop_uid>.dcm`` and ``ground_truth.csv``.

    A chest study has one frontal image (label drawn uniformly from CLASSES), often a
    lateral (view "LL", label "NORM") as its second image when ``include_lateral``, and
    further frontal images with the study's label up to its image count, drawn from
    ``images_per_study`` (inclusive range). About one study in seven is non-chest (HAND or
    KNEE, label "NORM") when ``include_non_chest``. One modality, photometric
    interpretation and bit depth per study, random unless ``dicom`` fixes them.
    ``masks`` writes lung-field masks for the frontal and non-chest images (empty for the
    latter) and none for the laterals, as :func:`generate_images`.
    """
    lo, hi = images_per_study
    if not 1 <= lo <= hi:
        raise ValueError(f"images_per_study must be (min, max) with 1 <= min <= max, got "
                         f"{images_per_study}")
    if n_studies < 0:
        raise ValueError("n_studies must be >= 0")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, 2**63 - 1, size=n_studies)
    rows_out: list[GroundTruth] = []
    with _progress(n_studies, progress, "studies") as bar:
        for s in seeds:
            r = np.random.default_rng(int(s))
            study = random_patient_study(r)
            opts = dicom if dicom is not None else _random_options(r)
            k = int(r.integers(lo, hi + 1))
            non_chest = include_non_chest and r.random() < 0.15
            if non_chest:
                part = "HAND" if r.random() < 0.5 else "KNEE"
                study = dataclasses.replace(study, study_description=_NON_CHEST_DESCRIPTIONS[part])
                rows, cols = size if size is not None else (
                    int(r.integers(900, 1500)) // 2 * 2, int(r.integers(800, 1200)) // 2 * 2)
            else:
                label = CLASSES[int(r.integers(0, len(CLASSES)))]
                lateral = include_lateral and k >= 2 and r.random() < 0.7
                rows, cols = size if size is not None else _random_size(r)
            for j in range(k):
                r_img = _child_rngs(r, 1)[0]
                if non_chest:
                    ph = _non_chest(r_img, part, rows, cols, masks)
                elif j == 1 and lateral:
                    ph = make_lateral(r_img, rows, cols)
                else:
                    ph = make_phantom(r_img, label, rows, cols, masks=masks)
                series_uid, sop_uid = _uid(r), _uid(r)
                rel = f"{study.study_instance_uid}/{sop_uid}.dcm"
                write_dicom(ph, out_dir / rel, study, opts, series_number=j + 1,
                            instance_number=1, series_instance_uid=series_uid,
                            sop_instance_uid=sop_uid)
                rows_out.append(GroundTruth(rel, ph.label, ph.boxes, rows, cols, ph.view,
                                            ph.body_part, study.study_instance_uid, sop_uid,
                                            *write_lung_masks(ph, out_dir, rel)))
            bar.update(1)
    _write_ground_truth(out_dir, rows_out)
    return rows_out
