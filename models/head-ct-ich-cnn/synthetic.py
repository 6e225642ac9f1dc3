"""Synthetic axial head CT slices in Hounsfield units, with and without acute haemorrhage.

Nothing here is patient data and nothing is downloaded. Every slice comes from a seeded random
generator, as it would look after :mod:`dicom_node.infer.preprocess` has resized a real slice to
the model's input in modality units (HU), before the card's windows: a ``size`` x ``size`` array
of whole HU, head anterior at the top, patient right on the image left (radiological view).

Two kinds of background, the label-bearing part drawn the same way on both:

- **phantom** (:func:`draw_phantom`): air, head holder, scalp, skull (tables and diploe, an
  occasional frontal sinus), a thin rim of CSF over the brain, cortex with sulci, white matter
  (grey/white contrast 7–14 HU), interhemispheric fissure and falx, lateral ventricles (CSF about
  5 HU; size and shape vary with level and age), at lower levels the third ventricle and the
  basal ganglia, periventricular low density; slice level, field of view (210–280 mm), position
  and rotation vary.
- **real** (:func:`augment_real`): a real slice given by the caller (train.py passes the head CT
  693_UNCR.dcm from pydicom-data, resized in HU with the preprocessing's own filter), flipped,
  rotated, scaled, shifted, offset in HU and given extra noise, so that the model sees real
  anatomy, real noise and real partial volume, not only the phantom's.

Positives carry one or two acute haemorrhages, hyperdense against brain (:data:`KINDS`):

- ``intraparenchymal``: an irregular blob 8–40 mm across, 55–85 HU, often with an oedema halo;
- ``subdural``: a crescent along the inner table over 60–150 degrees, 4–15 mm thick, 50–85 HU
  (sometimes a thin interhemispheric one along the falx instead);
- ``epidural``: a biconvex lens along the inner table over 30–70 degrees, 6–22 mm thick,
  55–90 HU;
- ``subarachnoid``: blood in the sulci (and often the interhemispheric fissure) of a region,
  45–75 HU;
- ``intraventricular``: blood layering in the dependent (posterior) part of the lateral
  ventricles, with a level that stays horizontal in the image, or a cast filling them, 50–80 HU.

Every slice, positive or not, may also carry mimics that the model must learn not to call blood:
calcifications (pineal, choroid plexus, falx, basal ganglia; 120–400 HU, small), falx itself,
hypodense infarcts, slightly hyperdense but sub-haemorrhagic regions (at most 45 HU), beam-
hardening streaks and cupping near the skull. Then a point-spread blur, correlated noise
(1.5–3.5 HU) and a global HU offset (±3 HU) are applied (to the phantom; real backgrounds have
their own blur and noise, and inserted regions get noise matched to theirs).

Chronic (hypodense or isodense) subdural collections are not drawn at all, in either class:
the label means *acute, hyperdense* haemorrhage, and the model is not taught what a chronic one
is. Only numpy is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FINDINGS = ("intracranial_hemorrhage",)
KINDS = ("intraparenchymal", "subdural", "epidural", "subarachnoid", "intraventricular")
#: Relative frequency of each haemorrhage kind in a positive slice.
KIND_WEIGHTS = (0.26, 0.26, 0.16, 0.18, 0.14)
AIR = -1000.0
#: Field of view (mm) of phantom slices; a real 512-matrix head CT is typically 220–260 mm.
FOV_MM = (210.0, 280.0)

Array = np.ndarray


@dataclass
class Head:
    """A slice in HU and what insertions need to know about it (pixel units unless named)."""

    hu: Array
    mm: float  # millimetres per pixel
    inside: Array  # intracranial space (bool)
    depth: Array  # distance from the inner table, pixels (0 outside)
    cy: float
    cx: float
    sulci: Array | None = None  # phantom only: soft mask of sulcal CSF
    ventricles: Array | None = None  # soft mask of ventricular CSF
    fissure: Array | None = None  # phantom only: soft mask of the interhemispheric fissure
    noise: float = 2.5  # std (HU) of the noise inserted regions get


# --- small numpy image tools ------------------------------------------------------------------


def _sig(z: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _blur_matrix(size: int, sigma: float) -> Array:
    idx = np.arange(size)
    w = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / max(sigma, 1e-3)) ** 2)
    return np.asarray(w / w.sum(axis=1, keepdims=True), dtype=np.float32)


def _blur(img: Array, sigma: float) -> Array:
    b = _blur_matrix(img.shape[0], sigma)
    return np.asarray(b @ img @ b.T)


def _field(rng: np.random.Generator, size: int, scale: float) -> Array:
    """Zero-mean, unit-std random field with correlation length ``scale`` pixels."""
    f = _blur(rng.standard_normal((size, size), dtype=np.float32), scale)
    return np.asarray((f - f.mean()) / (f.std() + 1e-8))


def _shift(mask: Array, dy: int, dx: int) -> Array:
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _dilate(mask: Array, diagonal: bool = False) -> Array:
    out = mask | _shift(mask, 1, 0) | _shift(mask, -1, 0) | _shift(mask, 0, 1) | _shift(mask, 0, -1)
    if diagonal:
        out |= _shift(mask, 1, 1) | _shift(mask, 1, -1) | _shift(mask, -1, 1) | _shift(mask, -1, -1)
    return np.asarray(out)


def _inside_skull(hu: Array, bone: float = 300.0) -> Array:
    """What the bone ring encloses: pixels not reachable from the border without crossing bone."""
    free = hu < bone
    reach = np.zeros_like(free)
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        reach[edge] = free[edge]
    while True:
        grown = _dilate(reach) & free
        if np.array_equal(grown, reach):
            break
        reach = grown
    return free & ~reach


def _depth(inside: Array, limit: int = 40) -> Array:
    """Distance (pixels, octagonal metric) from the edge of ``inside``, up to ``limit``."""
    depth = np.zeros(inside.shape, dtype=np.float32)
    cur = inside.copy()
    for i in range(limit):
        if not cur.any():
            break
        depth += cur
        outside = ~cur
        cur = cur & ~_dilate(outside, diagonal=bool(i % 2))
    return depth


def head_from_hu(hu: Array, mm: float, noise: float = 2.5) -> Head | None:
    """Find the intracranial space of a slice from its bone ring; None when there is none."""
    inside = _inside_skull(hu)
    if inside.sum() < 0.08 * hu.size:
        return None
    ys, xs = np.nonzero(inside)
    return Head(hu=hu, mm=mm, inside=inside, depth=_depth(inside), cy=float(ys.mean()),
                cx=float(xs.mean()), noise=noise)


# --- phantom -------------------------------------------------------------------------------------


def draw_phantom(rng: np.random.Generator, size: int) -> Head:
    """A normal head slice without blur or noise (see :func:`finish_phantom`)."""
    fov = rng.uniform(*FOV_MM)
    mm = fov / size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    level = rng.uniform(0.0, 1.0)  # 0: basal ganglia/third ventricle … 1: high convexity
    shrink = 1.0 - 0.25 * max(0.0, level - 0.55) / 0.45 - rng.uniform(0.0, 0.06)
    a = rng.uniform(60.0, 72.0) * shrink / mm  # inner half-width (left-right), pixels
    b = rng.uniform(77.0, 92.0) * shrink / mm  # inner half-length (anterior-posterior)
    cy = size / 2 + rng.uniform(-0.05, 0.05) * size
    cx = size / 2 + rng.uniform(-0.05, 0.05) * size
    theta = np.deg2rad(rng.uniform(-12.0, 12.0))
    # head coordinates: u to the patient's left (image right), v to posterior (image down)
    u = np.cos(theta) * (xx - cx) + np.sin(theta) * (yy - cy)
    v = -np.sin(theta) * (xx - cx) + np.cos(theta) * (yy - cy)
    phi = np.arctan2(v / b, u / a)
    wobble = 1.0 + sum(
        rng.uniform(-0.025, 0.025) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)
    )
    rho = np.hypot(u / a, v / b) / wobble
    radius = 1.0 / np.maximum(np.hypot(np.cos(phi) / a, np.sin(phi) / b), 1e-6) * wobble
    d = (1.0 - rho) * radius  # ~ pixels inside the inner table (negative: beyond it)
    px = 1.0 / mm  # one millimetre in pixels

    # outside: air, scalp, skull, head holder
    skull_t = rng.uniform(4.0, 8.0) * px * (1.0 + 0.25 * np.abs(np.sin(phi)))
    skull_t = np.maximum(skull_t, 2.5)  # at least 2.5 pixels, so that the ring is closed
    scalp_t = rng.uniform(3.0, 8.0) * px
    hu = np.full((size, size), AIR)
    hu = np.where(d > -(skull_t + scalp_t), rng.uniform(-40.0, 30.0), hu)
    in_bone = (d <= 0.0) & (d > -skull_t)
    table = np.abs(-d / skull_t - 0.5) * 2.0  # 0 in the middle of the bone, 1 at its edges
    bone_hu = rng.uniform(1100.0, 1700.0)
    hu = np.where(in_bone, bone_hu * (0.55 + 0.45 * table**2), hu)
    if rng.random() < 0.3:  # frontal sinus: air inside the anterior bone
        s = (np.abs(u) < rng.uniform(6.0, 16.0) * px) & (v < 0) & (d < -0.4 * skull_t - 0.8)
        s &= d > -0.8 * skull_t
        hu = np.where(s, AIR, hu)
    if rng.random() < 0.5:  # head holder: a U-shaped arc behind the head
        gap = rng.uniform(8.0, 25.0) * px
        arc = np.abs(d + skull_t + scalp_t + gap) < rng.uniform(0.7, 1.4) * px
        hu = np.where(arc & (v > -0.2 * b) & (d < 0), rng.uniform(100.0, 400.0), hu)

    # brain: CSF rim, cortex with sulci, white matter
    inside = d > 0
    depth_mm = d * mm
    rim = rng.uniform(0.5, 3.0) + 2.0 * rng.random() ** 2  # atrophy widens it
    gm = rng.uniform(34.0, 42.0)
    wm = gm - rng.uniform(7.0, 14.0)
    csf = rng.uniform(2.0, 10.0)
    f_gyri = _field(rng, size, rng.uniform(4.0, 7.0) / mm)
    sulcus_depth = rng.uniform(10.0, 22.0)
    sulci = _sig((rng.uniform(0.15, 0.3) - np.abs(f_gyri)) / 0.08)
    sulci *= _sig((sulcus_depth - depth_mm) / 2.0) * _sig((depth_mm - rim + 1.0) / 0.5)
    white = _sig((depth_mm - rim - rng.uniform(3.5, 6.0) - 3.0 * _field(rng, size, 6.0 / mm)) / 1.0)
    brain = gm + (wm - gm) * white
    # midline: interhemispheric fissure (front and back; all along at high levels)
    ventricle_zone = 0.0 if level > 0.8 else rng.uniform(0.25, 0.45)
    fissure = _sig((rng.uniform(0.6, 1.6) - np.abs(u * mm)) / 0.4)
    fissure *= _sig((np.abs(v) / b - ventricle_zone) / 0.05)
    brain = brain + (csf - brain) * np.maximum(sulci, fissure)
    falx = np.exp(-0.5 * (u * mm / rng.uniform(0.4, 0.7)) ** 2) * fissure
    brain = brain + rng.uniform(10.0, 40.0) * falx
    if level < 0.45:  # basal ganglia (grey) around the third ventricle
        for side in (-1.0, 1.0):
            bg = np.hypot((u - side * 22.0 * px) / (9.0 * px), (v + 2.0 * px) / (16.0 * px))
            brain = brain + (gm - 1.0 - brain) * _sig((1.0 - bg) / 0.12) * (depth_mm > 25)
    ventricles = np.zeros_like(hu)
    if level < 0.85:
        width = rng.uniform(2.5, 6.0) + 5.0 * rng.random() ** 2  # mm, wider with atrophy
        reach = (0.55 - 0.45 * max(0.0, level - 0.5)) * b
        for side in (-1.0, 1.0):
            t = np.clip(v / reach, -1.0, 1.0)
            centre = side * (rng.uniform(3.0, 7.0) * px + np.clip(t, 0.0, None) ** 2 * 10.0 * px)
            half = width * px * (0.5 + 0.5 * np.cos(np.pi * t / 2.0) ** 0.5) / 2.0
            horn = _sig((half - np.abs(u - centre)) / 0.5) * _sig((reach - np.abs(v)) / 0.7)
            ventricles = np.maximum(ventricles, horn)
        if level < 0.35:  # third ventricle
            third = _sig((rng.uniform(1.0, 2.5) * px - np.abs(u)) / 0.5)
            third *= _sig((8.0 * px - np.abs(v - 0.12 * b)) / 0.5)
            ventricles = np.maximum(ventricles, third)
        if rng.random() < 0.3:  # periventricular low density (small vessel disease)
            caps = np.exp(-0.5 * (_dist_to(ventricles) * mm / rng.uniform(2.0, 5.0)) ** 2)
            brain = brain - rng.uniform(4.0, 9.0) * caps * (ventricles < 0.5)
        brain = brain + (csf - brain) * ventricles
    brain = brain + rng.uniform(0.0, 6.0) * _sig((8.0 - depth_mm) / 2.0) * inside  # cupping
    hu = np.where(inside, brain, hu)
    return Head(hu=hu, mm=mm, inside=inside, depth=np.clip(d, 0.0, None) * inside, cy=cy, cx=cx,
                sulci=sulci * inside, ventricles=ventricles * inside, fissure=fissure, noise=0.0)


def _dist_to(mask: Array) -> Array:
    """Pixels to the nearest pixel of a soft ``mask`` (> 0.5), up to 20."""
    inv = _depth(mask <= 0.5, limit=20)
    return np.asarray(inv, dtype=np.float32)


def finish_phantom(rng: np.random.Generator, hu: Array) -> Array:
    """Acquisition: point-spread blur, streaks, correlated noise, HU offset."""
    size = hu.shape[0]
    out = _blur(hu, rng.uniform(0.45, 0.9))
    if rng.random() < 0.3:  # beam-hardening streaks through the brain
        yy, xx = np.mgrid[0:size, 0:size]
        for _ in range(rng.integers(1, 4)):
            ang = rng.uniform(0, np.pi)
            off = rng.uniform(-0.25, 0.25) * size
            dist = (xx - size / 2) * np.sin(ang) - (yy - size / 2) * np.cos(ang) - off
            line = np.exp(-0.5 * (dist / rng.uniform(0.6, 1.2)) ** 2)
            out = out + rng.uniform(-15.0, 12.0) * line * (np.abs(out) < 200)
    sigma = rng.uniform(1.5, 3.5)
    noise = _blur(rng.standard_normal((size, size), dtype=np.float32),
                  rng.uniform(0.5, 0.9))
    return np.asarray(out + sigma * noise / (noise.std() + 1e-8) + rng.uniform(-3.0, 3.0))


# --- real backgrounds ----------------------------------------------------------------------------


def _warp(rng: np.random.Generator, size: int
          ) -> tuple[tuple[Array, Array, Array, Array, Array], float]:
    """A random flip, rotation, scale and shift: bilinear sampling positions, and the scale."""
    ang = np.deg2rad(rng.uniform(-15.0, 15.0))
    scale = rng.uniform(0.85, 1.15)
    ty, tx = rng.uniform(-0.06, 0.06, size=2) * size
    flip = -1.0 if rng.random() < 0.5 else 1.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2.0
    y0, x0 = yy - c - ty, xx - c - tx
    sy = (np.cos(ang) * y0 - np.sin(ang) * x0) / scale + c
    sx = flip * (np.sin(ang) * y0 + np.cos(ang) * x0) / scale + c
    iy, ix = np.floor(sy).astype(int), np.floor(sx).astype(int)
    fy, fx = sy - iy, sx - ix
    outside = (sy < -1) | (sy > size) | (sx < -1) | (sx > size)
    iy, ix = np.clip(iy + 1, 0, size), np.clip(ix + 1, 0, size)
    return (iy, ix, fy, fx, outside), scale


def _sample(img: Array, where: tuple[Array, Array, Array, Array, Array], fill: float) -> Array:
    iy, ix, fy, fx, outside = where
    padded = np.pad(np.asarray(img, dtype=np.float32), 1, constant_values=fill)
    out = (
        padded[iy, ix] * (1 - fy) * (1 - fx)
        + padded[iy + 1, ix] * fy * (1 - fx)
        + padded[iy, ix + 1] * (1 - fy) * fx
        + padded[iy + 1, ix + 1] * fy * fx
    )
    return np.where(outside, fill, out)


def augment_real(rng: np.random.Generator, base: Head) -> Head:
    """A randomly flipped, rotated, scaled and shifted copy of a real slice, with extra noise.

    ``base`` is the real slice as :func:`head_from_hu` found it; its intracranial mask and
    depth are warped with the image (finding them again on every copy would be slow).
    """
    size = base.hu.shape[0]
    where, scale = _warp(rng, size)
    hu = _sample(np.maximum(base.hu, -1024.0), where, -1024.0)
    inside = _sample(base.inside, where, 0.0) > 0.5
    depth = _sample(base.depth, where, 0.0) * scale * inside
    ys, xs = np.nonzero(inside)
    head = Head(hu=hu, mm=base.mm / scale, inside=inside, depth=depth, cy=float(ys.mean()),
                cx=float(xs.mean()))
    extra = rng.uniform(0.0, 2.5)
    noise = _blur(rng.standard_normal((size, size), dtype=np.float32), 0.7)
    head.hu = head.hu + extra * noise / (noise.std() + 1e-8) + rng.uniform(-3.0, 3.0)
    head.noise = float(np.hypot(2.5, extra))
    head.ventricles = _csf_deep(head)
    return head


def _csf_deep(head: Head) -> Array | None:
    """Ventricles of a real slice, roughly: CSF-dense pixels more than 12 mm inside the skull."""
    deep = head.inside & (head.depth * head.mm > 12.0) & (head.hu < 14.0)
    return deep.astype(np.float32) if deep.sum() >= 6 else None


def with_bleed(hu: Array, mm: float, kind: str, seed: int, noise: float = 3.5) -> Array:
    """A copy of a real slice (HU, any matrix size) with one haemorrhage of ``kind`` inserted.

    Sizes are in millimetres, so this works on a full 512 x 512 slice as well as on the
    model-sized ones. Raises ValueError when the slice has no closed skull ring or the kind
    could not be placed.
    """
    head = head_from_hu(np.asarray(hu, dtype=np.float32), mm, noise=noise)
    if head is None:
        raise ValueError("no intracranial space found (the skull ring is not closed)")
    if head.depth.max() >= 40:  # _depth stops at 40 pixels: recompute deeper for big matrices
        head.depth = _depth(head.inside, limit=int(60.0 / mm))
    head.ventricles = _csf_deep(head)
    rng = np.random.default_rng(seed)
    if not BLEEDS[kind](rng, head):
        raise ValueError(f"could not place a {kind} haemorrhage in this slice")
    return head.hu


# --- insertions ----------------------------------------------------------------------------------


def _paint(rng: np.random.Generator, head: Head, mask: Array, value: Array | float) -> None:
    """Replace ``mask`` (soft, 0…1) of the slice with ``value`` plus noise like the slice's."""
    if head.noise > 0:  # regions painted on a noisy background get noise of their own
        noise = _blur(rng.standard_normal(head.hu.shape, dtype=np.float32), 0.7)
        value = value + head.noise * noise / (noise.std() + 1e-8)
    head.hu = head.hu + (value - head.hu) * np.clip(mask, 0.0, 1.0)


def _polar(head: Head) -> tuple[Array, Array]:
    size = head.hu.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.arctan2(yy - head.cy, xx - head.cx), np.hypot(yy - head.cy, xx - head.cx)


def _angle_diff(a: Array, b: float) -> Array:
    return np.asarray((a - b + np.pi) % (2 * np.pi) - np.pi, dtype=np.float32)


def _pick(rng: np.random.Generator, allowed: Array) -> tuple[int, int] | None:
    ys, xs = np.nonzero(allowed)
    if len(ys) == 0:
        return None
    i = rng.integers(len(ys))
    return int(ys[i]), int(xs[i])


def _blob(rng: np.random.Generator, shape: tuple[int, ...], cy: float, cx: float,
          radius: float, irregular: float) -> Array:
    """A soft blob of mean ``radius`` pixels with a randomly wavy outline."""
    waves = [(k, rng.uniform(-irregular, irregular), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)]
    elong = rng.uniform(0.7, 1.0)
    rot = rng.uniform(0, np.pi)
    reach = int(np.ceil(radius * (1.0 + 3.0 * irregular) / elong + 4.0))
    y0, y1 = max(0, int(cy) - reach), min(shape[0], int(cy) + reach + 1)
    x0, x1 = max(0, int(cx) - reach), min(shape[1], int(cx) + reach + 1)
    out = np.zeros(shape[:2], dtype=np.float32)
    if y0 >= y1 or x0 >= x1:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    ang = np.arctan2(dy, dx)
    r = radius * (1.0 + sum(a * np.cos(k * ang + ph) for k, a, ph in waves))
    along = np.cos(rot) * dx + np.sin(rot) * dy
    across = (-np.sin(rot) * dx + np.cos(rot) * dy) / elong
    out[y0:y1, x0:x1] = _sig((r - np.hypot(along, across)) / 0.5)
    return out


def bleed_intraparenchymal(rng: np.random.Generator, head: Head) -> bool:
    radius = rng.uniform(4.0, 20.0) / head.mm
    allowed = head.inside & (head.depth > radius + 5.0 / head.mm)
    if head.ventricles is not None:
        allowed &= head.ventricles < 0.3
    where = _pick(rng, allowed)
    if where is None:
        return False
    blob = _blob(rng, head.hu.shape, where[0], where[1], radius, 0.25) * head.inside
    if rng.random() < 0.6:  # vasogenic oedema around it
        halo = _blob(rng, head.hu.shape, where[0], where[1],
                     radius + rng.uniform(1.0, 5.0) / head.mm, 0.2) * head.inside
        _paint(rng, head, halo * (1 - blob), head.hu - rng.uniform(4.0, 12.0))
    blood = rng.uniform(55.0, 85.0) + 4.0 * _field(rng, head.hu.shape[0], 4.0 / head.mm)
    _paint(rng, head, blob, blood)
    return True


def _extra_axial(rng: np.random.Generator, head: Head, half_span: float, thickness: float,
                 power: float, hu: tuple[float, float]) -> bool:
    """Blood between skull and brain over an arc: crescent (small power) or lens (power 1)."""
    ang, _ = _polar(head)
    centre = rng.uniform(-np.pi, np.pi)
    t = np.clip(np.abs(_angle_diff(ang, centre)) / half_span, 0.0, 1.0)
    profile = thickness * (1.0 - t**2) ** power / head.mm
    region = _sig((profile - head.depth + 0.5) / 0.5) * (t < 1.0) * head.inside
    if region.sum() < 4:
        return False
    blood = rng.uniform(*hu) + 3.0 * _field(rng, head.hu.shape[0], 4.0 / head.mm)
    if rng.random() < 0.2:  # hyperacute: swirls of lower density
        swirl = _field(rng, head.hu.shape[0], 3.0 / head.mm) > 0.7
        blood = blood - rng.uniform(8.0, 18.0) * swirl
    _paint(rng, head, region, blood)
    return True


def bleed_subdural(rng: np.random.Generator, head: Head) -> bool:
    if head.fissure is not None and rng.random() < 0.15:  # along the falx
        size = head.hu.shape[0]
        yy = np.mgrid[0:size, 0:size][0]
        strip = head.fissure * (np.abs(yy - head.cy - rng.uniform(-15, 15) / head.mm)
                                < rng.uniform(10.0, 25.0) / head.mm)
        strip = _blur(strip, rng.uniform(1.0, 2.0) / head.mm) * 2.0 * head.inside
        if strip.max() > 0.4:
            _paint(rng, head, np.clip(strip, 0, 1), rng.uniform(50.0, 80.0))
            return True
    return _extra_axial(rng, head, np.deg2rad(rng.uniform(30.0, 75.0)), rng.uniform(4.0, 15.0),
                        rng.uniform(0.25, 0.45), (50.0, 85.0))


def bleed_epidural(rng: np.random.Generator, head: Head) -> bool:
    return _extra_axial(rng, head, np.deg2rad(rng.uniform(15.0, 35.0)), rng.uniform(6.0, 22.0),
                        rng.uniform(0.8, 1.2), (55.0, 90.0))


def bleed_subarachnoid(rng: np.random.Generator, head: Head) -> bool:
    size = head.hu.shape[0]
    ang, _ = _polar(head)
    if rng.random() < 0.3:
        region = np.ones_like(head.hu)  # diffuse
    else:
        half = np.deg2rad(rng.uniform(30.0, 90.0))
        region = _sig((half - np.abs(_angle_diff(ang, rng.uniform(-np.pi, np.pi)))) / 0.1)
    if head.sulci is not None:
        sulci = head.sulci
    else:  # a real slice: sulcus-like lines in the outer band of the brain
        scale = rng.uniform(4.0, 7.0) / head.mm  # as the phantom's gyri
        lines = _sig((rng.uniform(0.15, 0.3) - np.abs(_field(rng, size, scale))) / 0.08)
        sulci = lines * _sig((rng.uniform(10.0, 20.0) / head.mm - head.depth) / 1.0)
    mask = sulci * region
    if head.fissure is not None and rng.random() < 0.5:
        mask = np.maximum(mask, head.fissure * _sig((head.depth - 2.0) / 1.0))
    mask = mask * head.inside * rng.uniform(0.85, 1.0)
    if mask.sum() < 6:
        return False
    _paint(rng, head, mask, rng.uniform(45.0, 75.0))
    return True


def bleed_intraventricular(rng: np.random.Generator, head: Head) -> bool:
    if head.ventricles is None or head.ventricles.sum() < 6:
        return False
    size = head.hu.shape[0]
    yy = np.mgrid[0:size, 0:size][0].astype(np.float32)
    vent = head.ventricles
    if rng.random() < 0.3:
        mask = vent  # a cast
    else:  # supine: blood layers posteriorly (image down) below a horizontal level
        ys = np.nonzero(vent > 0.5)[0]
        if len(ys) == 0:
            return False
        level = np.quantile(ys, rng.uniform(0.45, 0.85))
        mask = vent * _sig((yy - level) / 0.4)
    if mask.sum() < 4:
        return False
    _paint(rng, head, mask, rng.uniform(50.0, 80.0))
    return True


BLEEDS = {
    "intraparenchymal": bleed_intraparenchymal,
    "subdural": bleed_subdural,
    "epidural": bleed_epidural,
    "subarachnoid": bleed_subarachnoid,
    "intraventricular": bleed_intraventricular,
}


def add_mimics(rng: np.random.Generator, head: Head) -> None:
    """Things that are not acute blood: calcifications, infarcts, faint hyperdensities."""
    size = head.hu.shape[0]
    if rng.random() < 0.35:  # calcifications: small and much denser than blood
        for _ in range(rng.integers(1, 3)):
            where = _pick(rng, head.inside & (head.depth > 4))
            if where is not None:
                dot = _blob(rng, head.hu.shape, where[0], where[1], rng.uniform(0.6, 1.6), 0.1)
                _paint(rng, head, dot, rng.uniform(120.0, 400.0))
    if rng.random() < 0.15:  # an infarct: hypodense, reaching the cortex
        where = _pick(rng, head.inside & (head.depth > 3) & (head.depth < 15.0 / head.mm))
        if where is not None:
            blob = _blob(rng, head.hu.shape, where[0], where[1], rng.uniform(6.0, 20.0) / head.mm,
                         0.3) * head.inside
            _paint(rng, head, blob, rng.uniform(5.0, 20.0))
    if rng.random() < 0.2:  # a faint hyperdensity that stays below blood (e.g. a mass, a vessel)
        where = _pick(rng, head.inside & (head.depth > 6))
        if where is not None:
            blob = _blob(rng, head.hu.shape, where[0], where[1], rng.uniform(3.0, 12.0) / head.mm,
                         0.25) * head.inside
            _paint(rng, head, blob, rng.uniform(36.0, 45.0))
    if head.sulci is None and rng.random() < 0.3:  # real slice: streak through the brain
        yy, xx = np.mgrid[0:size, 0:size]
        ang = rng.uniform(0, np.pi)
        dist = (xx - head.cx) * np.sin(ang) - (yy - head.cy) * np.cos(ang) - rng.uniform(-20, 20)
        head.hu = head.hu + rng.uniform(-12.0, 10.0) * np.exp(-0.5 * dist**2) * head.inside


def draw_sample(
    seed: int, index: int, size: int, prevalence: float, real: Head | None,
    real_fraction: float,
) -> tuple[Array, Array, str, float]:
    """Sample ``index`` of stream ``seed``: (HU as int16, labels, kinds, millimetres per pixel).

    ``real`` is a real slice (``size`` x ``size``, see :func:`head_from_hu`); a fraction
    ``real_fraction`` of samples use it as background. ``kinds`` names the background first
    ("phantom" or "real") and then the haemorrhages drawn, e.g. "real+subdural".
    """
    rng = np.random.default_rng([seed, index])
    positive = rng.random() < prevalence
    use_real = real is not None and rng.random() < real_fraction
    if use_real:
        assert real is not None
        head = augment_real(rng, real)
    else:
        head = draw_phantom(rng, size)  # noise=0: the phantom gets its noise at the end
    add_mimics(rng, head)
    drawn: list[str] = []
    if positive:
        wanted = 1 if rng.random() < 0.75 else 2
        for _ in range(20):
            kind = str(rng.choice(KINDS, p=KIND_WEIGHTS))
            if kind not in drawn and BLEEDS[kind](rng, head):
                drawn.append(kind)
            if len(drawn) == wanted:
                break
    hu = head.hu if use_real else finish_phantom(rng, head.hu)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    label = np.array([1.0 if drawn else 0.0], dtype=np.float32)
    return hu, label, "+".join(["real" if use_real else "phantom", *drawn]), head.mm


def make_dataset(
    seed: int, start: int, stop: int, size: int, prevalence: float = 0.5,
    real: tuple[Array, float] | None = None, real_fraction: float = 0.0,
) -> tuple[Array, Array, list[str], Array]:
    """Samples ``start``…``stop - 1`` of stream ``seed``.

    ``real`` is a real slice in HU (``size`` x ``size``) and its millimetres per pixel.
    Returns HU (n, size, size) int16, labels (n, 1), kinds (see :func:`draw_sample`) and
    millimetres per pixel (n,).
    """
    base = None
    if real is not None and real_fraction > 0:
        base = head_from_hu(np.asarray(real[0], dtype=np.float32), real[1])
        if base is None:
            raise ValueError("the real background has no closed skull ring")
    n = stop - start
    images = np.empty((n, size, size), dtype=np.int16)
    labels = np.empty((n, len(FINDINGS)), dtype=np.float32)
    spacing = np.empty(n, dtype=np.float64)
    kinds: list[str] = []
    for i in range(n):
        images[i], labels[i], kind, spacing[i] = draw_sample(
            seed, start + i, size, prevalence, base, real_fraction
        )
        kinds.append(kind)
    return images, labels, kinds, spacing
