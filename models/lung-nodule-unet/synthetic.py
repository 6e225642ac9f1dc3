"""Procedural synthetic chest CT with lung nodules, in Hounsfield units, on any slice geometry.

Nothing here is real patient data and nothing is downloaded: every volume is drawn from a seeded
random generator. The phantom is defined in continuous patient coordinates (DICOM LPS, mm:
+x patient left, +y posterior, +z superior; the image centre is x = y = 0), so it can be sampled
on any axial grid — any pixel spacing, any list of slice positions (irregular, with gaps).

What is drawn (soft edges, i.e. partial volume, over about one pixel):

- air around the body; subcutaneous fat (−100 HU) and chest-wall muscle (45 HU);
- ribs (cortical shell ~800 HU around ~250 HU marrow) in the chest wall, appearing and
  disappearing along z as oblique ribs do in axial slices;
- vertebral bodies with disc spaces, spinal canal; mediastinal fat; heart; ascending and
  descending aorta; trachea above the carina. With probability 0.5 the scan is "contrast
  enhanced": blood (heart, aorta, lung vessels) 160–300 HU, else 35–50 HU;
- two lungs (−850 HU with a smooth texture and a posterior density gradient), rounded apices
  and diaphragm domes (below them: abdomen, 55 HU);
- a pulmonary vessel tree per lung, bifurcating from the hilum so that it fills the lung,
  radius 4–5.5 mm down to ~0.6 mm, clipped to the lungs (in axial slices the branches look
  like round or oval blobs — the classic nodule mimic);
- nodules: ellipsoids 3–25 mm (volume-equivalent diameter), solid soft tissue (−20…70 HU),
  in the lungs; about a third touch a vessel;
- in-plane blur (PSF, sigma 0.6 px) and Gaussian noise (sigma 8–30 HU).

Ground truth: a voxel belongs to nodule *k* when its centre is inside nodule *k*'s ellipsoid
(:attr:`SyntheticCT.labels`, 0 = background); :attr:`SyntheticCT.soft` is the partial-volume
fraction of nodule in each voxel (the training target). numpy and scipy.ndimage only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

F32 = NDArray[np.float32]
#: The z range (mm) over which the lungs lie in every phantom (dome bottom … apex).
LUNG_Z = (-110.0, 110.0)
#: Nodule diameters (volume-equivalent, mm) drawn by :func:`random_nodules`.
NODULE_DIAMETER_MM = (3.0, 25.0)


@dataclass(frozen=True)
class Nodule:
    """A nodule: an ellipsoid in patient coordinates."""

    center: tuple[float, float, float]
    #: Semi-axes (mm) before rotation.
    semi_axes: tuple[float, float, float]
    #: 3×3 rotation (rows: the ellipsoid's axes in patient coordinates).
    rotation: tuple[tuple[float, float, float], ...] = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    hu: float = 40.0

    @property
    def volume_mm3(self) -> float:
        a, b, c = self.semi_axes
        return float(4.0 / 3.0 * np.pi * a * b * c)

    @property
    def diameter_mm(self) -> float:
        """Volume-equivalent diameter."""
        return float(2.0 * np.prod(self.semi_axes) ** (1.0 / 3.0))

    @property
    def longest_diameter_mm(self) -> float:
        return float(2.0 * max(self.semi_axes))

    @staticmethod
    def sphere(center: tuple[float, float, float], diameter: float, hu: float = 40.0) -> Nodule:
        r = diameter / 2.0
        return Nodule(center=center, semi_axes=(r, r, r), hu=hu)


@dataclass(frozen=True)
class Grid:
    """An axial sampling grid: rows × cols pixels of ``pixel_spacing`` mm on each z position."""

    rows: int
    cols: int
    #: (row spacing, column spacing) in mm, as DICOM PixelSpacing.
    pixel_spacing: tuple[float, float]
    #: z (mm) of each slice, in the order the volume is drawn.
    z: tuple[float, ...]

    @property
    def origin(self) -> tuple[float, float]:
        """(x, y) of the centre of the top-left pixel (the image is centred on x = y = 0)."""
        return (-(self.cols - 1) / 2.0 * self.pixel_spacing[1],
                -(self.rows - 1) / 2.0 * self.pixel_spacing[0])

    def image_position(self, k: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice ``k``."""
        x0, y0 = self.origin
        return (x0, y0, float(self.z[k]))


@dataclass(frozen=True)
class SyntheticCT:
    """A drawn volume: HU (slices, rows, cols), nodule labels, partial-volume nodule fraction."""

    grid: Grid
    hu: F32
    labels: NDArray[np.int16]
    soft: F32
    nodules: tuple[Nodule, ...]
    #: Fraction of lung vessel in each voxel (where training looks for hard negatives).
    vessels: F32


@dataclass(frozen=True)
class Phantom:
    """The anatomy of one synthetic patient (random sizes, positions and densities)."""

    body: tuple[float, float]
    fat: float
    lung_center: tuple[float, float]
    lung_axes: tuple[float, float]
    apex_z: float
    dome_z: float
    dome_height: float
    heart: tuple[float, float, float, float, float, float]  # cx, cy, cz, ax, ay, az
    spine_y: float
    blood_hu: float
    noise_hu: float
    rib_phase: float
    #: Vessel segments: start (n, 3), end (n, 3), radius (n,).
    vessels: tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]


def _ramp(d: NDArray[np.floating], w: float) -> F32:
    """Fraction inside for signed distance ``d`` (negative inside) with an edge ``w`` mm wide."""
    return np.asarray(np.clip(0.5 - d / w, 0.0, 1.0), dtype=np.float32)


def _ellipse_sd(x: NDArray[np.floating], y: NDArray[np.floating], cx: float, cy: float,
                ax: float | NDArray[np.floating], ay: float | NDArray[np.floating]) -> F32:
    """First-order signed distance (mm) to an axis-aligned ellipse (negative inside)."""
    u, v = (x - cx) / ax, (y - cy) / ay
    q = np.sqrt(u * u + v * v) + 1e-9
    grad = np.sqrt((u / ax) ** 2 + (v / ay) ** 2) / q + 1e-9
    return np.asarray((q - 1.0) / grad, dtype=np.float32)


def draw_phantom(rng: np.random.Generator) -> Phantom:
    """Random anatomy, including the pulmonary vessel trees."""
    bx, by = rng.uniform(130, 170), rng.uniform(95, 125)
    fat = rng.uniform(8, 22)
    lung_center = (min(rng.uniform(60, 75), bx - fat - 58), rng.uniform(0, 10))
    lung_axes = (min(rng.uniform(45, 58), bx - fat - 18 - lung_center[0]),
                 min(rng.uniform(60, 80), by - fat - 16 - lung_center[1]))
    heart = (rng.uniform(10, 30), rng.uniform(-45, -25), rng.uniform(-70, -40),
             rng.uniform(45, 60), rng.uniform(38, 48), rng.uniform(50, 65))
    contrast = rng.random() < 0.5
    phantom = Phantom(
        body=(bx, by), fat=fat, lung_center=lung_center, lung_axes=lung_axes,
        apex_z=rng.uniform(100, 115), dome_z=rng.uniform(-115, -100),
        dome_height=rng.uniform(35, 55), heart=heart,
        spine_y=by - fat - rng.uniform(45, 55),
        blood_hu=rng.uniform(160, 300) if contrast else rng.uniform(35, 50),
        noise_hu=rng.uniform(8, 30), rib_phase=rng.uniform(0, 1),
        vessels=(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0)),
    )
    return Phantom(**{**phantom.__dict__, "vessels": _vessel_tree(rng, phantom)})


def _vessel_tree(rng: np.random.Generator, ph: Phantom) -> tuple[
        NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """A bifurcating tree per lung that fills it: from the hilum, each branch runs half-way
    towards the mean of the lung points it supplies, then splits them in two along their
    principal axis; radius 4–5.5 mm at the hilum, × 0.78 per generation, down to ~0.6 mm."""
    starts: list[NDArray[np.float64]] = []
    ends: list[NDArray[np.float64]] = []
    radii: list[float] = []
    lx, ly = ph.lung_center
    ax, ay = ph.lung_axes
    for side in (-1.0, 1.0):
        cand = np.column_stack([side * lx + rng.uniform(-ax, ax, 4000),
                                ly + rng.uniform(-ay, ay, 4000),
                                rng.uniform(ph.dome_z, ph.apex_z, 4000)])
        xyz = cand.astype(np.float32)
        inside = lung_fraction(ph, xyz[:, 0], xyz[:, 1], xyz[:, 2], 1.0)
        points = cand[inside > 0.99][:384]
        hilum = np.array([side * (lx - ax * 0.6), ly, rng.uniform(-10, 20)])
        stack = [(hilum, points, rng.uniform(4.0, 5.5))]
        while stack:
            p0, pts, r = stack.pop()
            target = pts.mean(axis=0)
            leaf = len(pts) < 3 or r < 0.7
            p1 = target if leaf else p0 + (target - p0) * rng.uniform(0.4, 0.6)
            p1 = p1 + rng.normal(0, 1.0, 3)
            starts.append(p0)
            ends.append(p1)
            radii.append(r)
            if leaf:
                continue
            centred = pts - target
            axis = np.linalg.svd(centred, full_matrices=False)[2][0]
            side_of = centred @ axis > 0
            for part in (pts[side_of], pts[~side_of]):
                if len(part):
                    stack.append((p1, part, r * rng.uniform(0.74, 0.82)))
    return np.array(starts), np.array(ends), np.array(radii)


def lung_fraction(ph: Phantom, x: F32, y: F32, z: F32, w: float) -> F32:
    """Fraction of lung at points (x, y, z) (broadcast arrays), edges ``w`` mm wide."""
    lx, ly = ph.lung_center
    ax, ay = ph.lung_axes
    apex = np.clip((ph.apex_z - z) / 60.0, 0.0, 1.0)
    scale = np.sqrt(np.maximum(apex, 1e-4)) * (1.0 - 0.12 * (z - ph.dome_z) / 220.0)
    total = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.float32)
    for side in (-1.0, 1.0):
        sd = _ellipse_sd(x, y, side * lx, ly, ax * scale, ay * scale)
        rho2 = ((x - side * lx) / ax) ** 2 + ((y - ly) / ay) ** 2
        dome = ph.dome_z + ph.dome_height * np.clip(1.0 - rho2, 0.0, 1.0) + (side > 0) * 6.0
        frac = np.minimum(_ramp(sd, w), _ramp(dome - z, w))
        total = np.maximum(total, frac)
    cx, cy, cz, hx, hy, hz = ph.heart
    heart = _ramp(_ellipse_sd(x, y, cx, cy, hx * _cap(z, cz, hz), hy * _cap(z, cz, hz)), w)
    mediastinum = _ramp(np.abs(x) - 22.0 - 8.0 * (y < 0), w) * (z < ph.apex_z)
    return np.asarray(np.minimum(total, 1.0 - np.maximum(heart, mediastinum)), dtype=np.float32)


def _cap(z: F32, cz: float, hz: float) -> F32:
    """Cross-section scale of an ellipsoid of half-height hz centred at cz, at height z."""
    return np.asarray(np.sqrt(np.clip(1.0 - ((z - cz) / hz) ** 2, 1e-4, 1.0)), dtype=np.float32)


def _blend(img: F32, value: float | F32, frac: F32) -> None:
    img += frac * (value - img)


def _segment_distance(p: NDArray[np.float32], a: NDArray[np.float64],
                      b: NDArray[np.float64]) -> F32:
    ab = (b - a).astype(np.float32)
    t = np.clip(((p - a.astype(np.float32)) @ ab) / float(ab @ ab + 1e-9), 0.0, 1.0)
    closest = a.astype(np.float32) + t[..., None] * ab
    return np.asarray(np.linalg.norm(p - closest, axis=-1), dtype=np.float32)


def render(ph: Phantom, grid: Grid, nodules: tuple[Nodule, ...],
           rng: np.random.Generator) -> SyntheticCT:
    """Sample the phantom and its nodules on ``grid``; add blur and noise."""
    dy, dx = grid.pixel_spacing
    w = float(max(dx, dy))
    x0, y0 = grid.origin
    xs = (x0 + np.arange(grid.cols, dtype=np.float32) * dx)[None, None, :]
    ys = (y0 + np.arange(grid.rows, dtype=np.float32) * dy)[None, :, None]
    zs = np.asarray(grid.z, dtype=np.float32)[:, None, None]
    shape = (len(grid.z), grid.rows, grid.cols)
    img = np.full(shape, -1000.0, dtype=np.float32)
    bx, by = ph.body
    _blend(img, -100.0, _ramp(_ellipse_sd(xs, ys, 0, 0, bx, by), w))
    _blend(img, 45.0, _ramp(_ellipse_sd(xs, ys, 0, 0, bx - ph.fat, by - ph.fat), w))
    _draw_ribs(img, ph, xs, ys, zs, w)
    _blend(img, -90.0, _ramp(_ellipse_sd(xs, ys, 0, -15, 45, 60), w) * (zs > ph.dome_z + 20))
    _blend(img, 55.0, _ramp(zs - ph.dome_z - 25.0, 3.0) * _ramp(
        _ellipse_sd(xs, ys, 0, 0, bx - ph.fat, by - ph.fat), w))
    lung = lung_fraction(ph, xs, ys, zs, w)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (1, 3, 3))
    parenchyma = -860.0 + 40.0 * ys / by + 250.0 * texture
    _blend(img, parenchyma.astype(np.float32), lung)
    cx, cy, cz, hx, hy, hz = ph.heart
    s = _cap(zs, cz, hz) * (np.abs(zs - cz) < hz)
    _blend(img, ph.blood_hu * 0.8 + 8.0, _ramp(_ellipse_sd(xs, ys, cx, cy, hx * s + 1e-3,
                                                          hy * s + 1e-3), w) * (s > 0.05))
    _blend(img, ph.blood_hu, _ramp(_ellipse_sd(xs, ys, 5, -20, 15, 15), w) * (zs > cz))
    _blend(img, ph.blood_hu, _ramp(_ellipse_sd(xs, ys, 22, ph.spine_y - 15, 12, 12), w))
    _blend(img, -1000.0, _ramp(_ellipse_sd(xs, ys, 0, -5, 8, 8), w) * (zs > 30))
    _draw_spine(img, ph, xs, ys, zs, w)
    vessels = _draw_vessels(img, ph, grid, lung, w)
    labels, soft = _draw_nodules(img, grid, nodules, w)
    img = ndimage.gaussian_filter(img, (0, 0.6, 0.6))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0, 0.7, 0.7))
    img += noise * (ph.noise_hu / 0.4)
    return SyntheticCT(grid=grid, hu=img.astype(np.float32), labels=labels, soft=soft,
                       nodules=nodules, vessels=vessels)


def _draw_ribs(img: F32, ph: Phantom, xs: F32, ys: F32, zs: F32, w: float) -> None:
    bx, by = ph.body
    rx, ry = bx - ph.fat - 9.0, by - ph.fat - 8.0
    for j, angle in enumerate(np.linspace(0.35, 2 * np.pi - 0.35, 14)):
        if abs(np.cos(angle)) < 0.25 and np.sin(angle) > 0:
            continue  # not over the spine
        cx, cy = rx * np.cos(angle), ry * np.sin(angle)
        present = np.sin(2 * np.pi * (zs / 38.0 + ph.rib_phase + 0.37 * j)) > 0.2
        sd = _ellipse_sd(xs, ys, cx, cy, 6.5, 6.5)
        _blend(img, 800.0, _ramp(sd, w) * present)
        _blend(img, 250.0, _ramp(sd + 2.0, w) * present)


def _draw_spine(img: F32, ph: Phantom, xs: F32, ys: F32, zs: F32, w: float) -> None:
    disc = (np.abs(((zs / 28.0) % 1.0) - 0.5) < 0.09).astype(np.float32)
    sd = _ellipse_sd(xs, ys, 0, ph.spine_y, 19, 16)
    _blend(img, 650.0 - 570.0 * disc, _ramp(sd, w))
    _blend(img, 230.0 - 150.0 * disc, _ramp(sd + 2.5, w))
    _blend(img, 20.0, _ramp(_ellipse_sd(xs, ys, 0, ph.spine_y + 27, 8, 8), w))
    _blend(img, 500.0, _ramp(_ellipse_sd(xs, ys, 0, ph.spine_y + 45, 5, 10), w))


def _box(grid: Grid, lo: NDArray[np.float64], hi: NDArray[np.float64]) -> tuple[
        NDArray[np.intp], slice, slice] | None:
    """Voxel index ranges of the grid inside the patient-space box [lo, hi]."""
    dy, dx = grid.pixel_spacing
    x0, y0 = grid.origin
    z = np.asarray(grid.z)
    ks = np.nonzero((z >= lo[2]) & (z <= hi[2]))[0]
    c0, c1 = max(0, int(np.floor((lo[0] - x0) / dx))), min(grid.cols, int((hi[0] - x0) / dx) + 2)
    r0, r1 = max(0, int(np.floor((lo[1] - y0) / dy))), min(grid.rows, int((hi[1] - y0) / dy) + 2)
    if len(ks) == 0 or c0 >= c1 or r0 >= r1:
        return None
    return ks, slice(r0, r1), slice(c0, c1)


def _points(grid: Grid, ks: NDArray[np.intp], rs: slice, cs: slice) -> NDArray[np.float32]:
    dy, dx = grid.pixel_spacing
    x0, y0 = grid.origin
    z = np.asarray(grid.z, dtype=np.float32)[ks]
    y = (y0 + np.arange(rs.start, rs.stop) * dy).astype(np.float32)
    x = (x0 + np.arange(cs.start, cs.stop) * dx).astype(np.float32)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return np.stack([xx, yy, zz], axis=-1)


def _draw_vessels(img: F32, ph: Phantom, grid: Grid, lung: F32, w: float) -> F32:
    frac = np.zeros_like(img)
    for a, b, r in zip(*ph.vessels, strict=True):
        pad = r + w
        box = _box(grid, np.minimum(a, b) - pad, np.maximum(a, b) + pad)
        if box is None:
            continue
        ks, rs, cs = box
        d = _segment_distance(_points(grid, ks, rs, cs), a, b)
        peak = min(1.0, 2.0 * r / w)
        f = peak * _ramp(d - max(r, w / 2.0), w)
        frac[ks, rs, cs] = np.maximum(frac[ks, rs, cs], f)
    frac *= np.clip(lung * 1.5, 0.0, 1.0)
    _blend(img, ph.blood_hu, frac)
    return frac


def _draw_nodules(img: F32, grid: Grid, nodules: tuple[Nodule, ...],
                  w: float) -> tuple[NDArray[np.int16], F32]:
    labels = np.zeros(img.shape, dtype=np.int16)
    soft = np.zeros(img.shape, dtype=np.float32)
    for k, nod in enumerate(nodules, start=1):
        c = np.asarray(nod.center, dtype=np.float64)
        reach = max(nod.semi_axes) + w
        box = _box(grid, c - reach, c + reach)
        if box is None:
            continue
        ks, rs, cs = box
        rot = np.asarray(nod.rotation, dtype=np.float32)
        local = (_points(grid, ks, rs, cs) - c.astype(np.float32)) @ rot.T
        axes = np.asarray(nod.semi_axes, dtype=np.float32)
        u = local / axes
        q = np.sqrt((u * u).sum(-1)) + 1e-9
        grad = np.sqrt(((u / axes) ** 2).sum(-1)) / q + 1e-9
        sd = (q - 1.0) / grad
        peak = min(1.0, 2.0 * float(axes.min()) / w)
        f = peak * _ramp(sd - max(0.0, w / 2.0 - float(axes.min())), w)
        sub = np.ix_(ks, np.arange(rs.start, rs.stop), np.arange(cs.start, cs.stop))
        block = img[sub]
        _blend(block, nod.hu, f)
        img[sub] = block
        soft[sub] = np.maximum(soft[sub], f)
        lab = labels[sub]
        lab[q <= 1.0] = k
        labels[sub] = lab
    return labels, soft


def _random_rotation(rng: np.random.Generator) -> tuple[tuple[float, float, float], ...]:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return tuple((float(row[0]), float(row[1]), float(row[2])) for row in q)


def random_nodules(rng: np.random.Generator, ph: Phantom, count: int,
                   z_range: tuple[float, float],
                   diameter_mm: tuple[float, float] = NODULE_DIAMETER_MM) -> tuple[Nodule, ...]:
    """``count`` random nodules inside the lungs, centred in ``z_range``; ~1/3 touch a vessel.
    Diameters (volume-equivalent) are log-uniform in ``diameter_mm``."""
    lo, hi = np.log(diameter_mm[0]), np.log(diameter_mm[1])
    starts, ends, radii = ph.vessels
    out: list[Nodule] = []
    for _ in range(count * 50):
        if len(out) == count:
            break
        d = float(np.exp(rng.uniform(lo, hi)))
        ratios = rng.uniform(0.8, 1.25, 3)
        semi = d / 2.0 * ratios / np.prod(ratios) ** (1.0 / 3.0)
        if rng.random() < 0.35:
            big = np.nonzero(radii >= 1.0)[0]
            i = int(rng.choice(big))
            t = rng.uniform(0.2, 0.8)
            on = starts[i] + t * (ends[i] - starts[i])
            perp = np.cross(ends[i] - starts[i], rng.standard_normal(3))
            center = on + perp / np.linalg.norm(perp) * (radii[i] + 0.9 * float(semi.mean()))
        else:
            center = np.array([rng.uniform(-130, 130), rng.uniform(-90, 90),
                               rng.uniform(*z_range)])
        if not z_range[0] <= center[2] <= z_range[1]:
            continue
        probe = center + np.array([[0, 0, 0], [semi.max(), 0, 0], [-semi.max(), 0, 0],
                                   [0, semi.max(), 0], [0, -semi.max(), 0]])
        inside = lung_fraction(ph, probe[:, 0].astype(np.float32), probe[:, 1].astype(
            np.float32), probe[:, 2].astype(np.float32), 1.0)
        if inside[0] < 1.0 or inside.mean() < 0.8:
            continue
        if any(np.linalg.norm(center - np.asarray(n.center)) < d / 2 + n.diameter_mm / 2 + 4
               for n in out):
            continue
        out.append(Nodule(center=(float(center[0]), float(center[1]), float(center[2])),
                          semi_axes=(float(semi[0]), float(semi[1]), float(semi[2])),
                          rotation=_random_rotation(rng), hu=float(rng.uniform(-20, 70))))
    return tuple(out)


def make_case(seed: int, grid: Grid, nodule_count: int | None = None,
              nodules: tuple[Nodule, ...] | None = None,
              diameter_mm: tuple[float, float] = NODULE_DIAMETER_MM) -> SyntheticCT:
    """One synthetic CT on ``grid``: given nodules, or ``nodule_count`` random ones (0–4 if
    None) within the grid's z range. The same seed and grid always give the same volume."""
    rng = np.random.default_rng(seed)
    ph = draw_phantom(rng)
    if nodules is None:
        count = int(rng.integers(0, 5)) if nodule_count is None else nodule_count
        z_lo, z_hi = min(grid.z), max(grid.z)
        nodules = random_nodules(rng, ph, count, (z_lo + 2.0, z_hi - 2.0), diameter_mm)
    return render(ph, grid, nodules, rng)
