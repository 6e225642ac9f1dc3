"""CT-like slices in Hounsfield units and a physically motivated low-dose noise model.

Nothing is downloaded and no patient data is drawn: the clean slices are

* :func:`shepp_logan_hu` — scikit-image's modified Shepp–Logan head phantom mapped to HU
  (air, skull, brain, CSF, small soft-tissue inserts);
* :func:`random_head` / :func:`random_body` — random ellipse phantoms: a skull ring with brain,
  ventricles and lesions; or a trunk with fat, muscle, organs, lungs, vertebra, ribs and
  contrast-filled vessels. Each gets a smooth random tissue texture and a slight blur (the
  scanner's resolution), so that edges and texture are not those of perfect geometry;
* real slices from pydicom's test files (``CT_small.dcm``), read by exact name, converted to HU
  (:func:`real_slice_hu`).

Low dose (:func:`simulate_low_dose`) is simulated in the projection domain: the slice's linear
attenuation (water 0.0192 /mm, about 70 keV) is forward projected (parallel-beam Radon transform,
180°), the transmitted photon counts ``N = N0·exp(-p)`` are drawn from a Poisson distribution,
and the log of the noisy counts gives a noisy sinogram. The noise image is the filtered back
projection (ramp filter) of the sinogram difference, added to the clean slice. So the noise is
not white: it is correlated (the ramp filter), stronger behind dense or long paths (fewer photons
reach the detector: attenuation-dependent), and streaky along bone.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon, radon, resize

FloatArray = NDArray[np.float64]

#: Linear attenuation coefficient of water, per mm (≈ 0.19 /cm at ~70 keV).
MU_WATER_PER_MM = 0.0192
AIR_HU = -1000.0


def _ellipse(shape: tuple[int, int], centre: tuple[float, float], axes: tuple[float, float],
             angle: float) -> NDArray[np.bool_]:
    """A filled ellipse mask; centre and axes are fractions of the image size (−1…1 frame)."""
    rows, cols = shape
    y, x = np.mgrid[-1.0:1.0:rows * 1j, -1.0:1.0:cols * 1j]
    dy, dx = y - centre[0], x - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u = (dx * c + dy * s) / axes[1]
    v = (-dx * s + dy * c) / axes[0]
    return np.asarray(u * u + v * v <= 1.0)


def _texture(shape: tuple[int, int], rng: np.random.Generator, amplitude: float,
             sigma: float) -> FloatArray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    field /= field.std() + 1e-12
    return np.asarray(field * amplitude)


def _finish(hu: FloatArray, body: NDArray[np.bool_], rng: np.random.Generator) -> FloatArray:
    """Add tissue texture inside the body and blur by the scanner's resolution."""
    shape = (hu.shape[0], hu.shape[1])
    texture = _texture(shape, rng, rng.uniform(3.0, 15.0), rng.uniform(1.5, 4.0))
    texture += _texture(shape, rng, rng.uniform(1.0, 6.0), rng.uniform(0.6, 1.2))
    hu = hu + np.where(body, texture, 0.0)
    return np.asarray(ndimage.gaussian_filter(hu, rng.uniform(0.4, 0.9)))


def shepp_logan_hu(size: int, rng: np.random.Generator) -> FloatArray:
    """The modified Shepp–Logan phantom in HU: skull ~1200, brain ~35, CSF ~5, inserts 20–70."""
    phantom = resize(shepp_logan_phantom(), (size, size), order=0, anti_aliasing=False)
    level = np.round(phantom, 1)
    inside = ndimage.binary_fill_holes(phantom > 0)
    hu = np.full(phantom.shape, AIR_HU)
    lookup = {0.0: 5.0, 0.1: 20.0, 0.2: 35.0, 0.3: 55.0, 0.4: 70.0, 1.0: 1200.0}
    for value, target in lookup.items():
        hu[inside & np.isclose(level, value)] = target + rng.normal(0.0, 3.0)
    if rng.random() < 0.5:
        hu = np.fliplr(hu)
    return _finish(hu, np.asarray(inside), rng)


def random_head(size: int, rng: np.random.Generator) -> FloatArray:
    """An axial head-like slice: scalp, skull ring, brain with grey/white texture, ventricles,
    a few lesions (hypo- or hyperdense), sometimes a calcification."""
    shape = (size, size)
    angle = rng.uniform(-0.3, 0.3)
    centre = (rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08))
    a, b = rng.uniform(0.62, 0.82), rng.uniform(0.5, 0.7)
    hu = np.full(shape, AIR_HU)
    head = _ellipse(shape, centre, (a, b), angle)
    thickness = rng.uniform(0.04, 0.08)
    inner = _ellipse(shape, centre, (a - thickness, b - thickness), angle)
    brain = _ellipse(shape, centre, (a - thickness - 0.015, b - thickness - 0.015), angle)
    hu[head] = rng.uniform(20.0, 60.0)  # scalp
    hu[head & ~inner] = rng.uniform(900.0, 1800.0)  # skull
    hu[inner] = rng.uniform(0.0, 10.0)  # CSF layer
    hu[brain] = rng.uniform(28.0, 40.0)
    # white matter: a slightly darker blob field inside the brain
    white = ndimage.gaussian_filter(rng.standard_normal(shape), size / 24) > 0.02
    hu[brain & white] -= rng.uniform(5.0, 10.0)
    for side in (-1.0, 1.0):  # lateral ventricles
        vc = (centre[0] + rng.uniform(-0.1, 0.05), centre[1] + side * rng.uniform(0.06, 0.14))
        hu[_ellipse(shape, vc, (rng.uniform(0.12, 0.25), rng.uniform(0.03, 0.07)),
                    angle + rng.uniform(-0.3, 0.3)) & brain] = rng.uniform(0.0, 12.0)
    for _ in range(rng.integers(0, 4)):
        lc = (centre[0] + rng.uniform(-0.4, 0.4) * a, centre[1] + rng.uniform(-0.4, 0.4) * b)
        r = rng.uniform(0.02, 0.1)
        delta = rng.choice([-1.0, 1.0]) * rng.uniform(8.0, 40.0)
        hu[_ellipse(shape, lc, (r, r * rng.uniform(0.6, 1.4)), rng.uniform(0, np.pi))
           & brain] += delta
    if rng.random() < 0.3:
        cc = (centre[0] + rng.uniform(-0.3, 0.3), centre[1] + rng.uniform(-0.3, 0.3))
        hu[_ellipse(shape, cc, (0.015, 0.015), 0.0) & brain] = rng.uniform(150.0, 600.0)
    return _finish(hu, head, rng)


def random_body(size: int, rng: np.random.Generator) -> FloatArray:
    """An axial trunk-like slice: fat, muscle, organs, optional lungs, vertebra, ribs, vessels."""
    shape = (size, size)
    angle = rng.uniform(-0.15, 0.15)
    centre = (rng.uniform(-0.05, 0.1), rng.uniform(-0.05, 0.05))
    a, b = rng.uniform(0.45, 0.65), rng.uniform(0.7, 0.92)
    hu = np.full(shape, AIR_HU)
    body = _ellipse(shape, centre, (a, b), angle)
    fat = rng.uniform(0.03, 0.1)
    muscle = _ellipse(shape, centre, (a - fat, b - fat), angle)
    hu[body] = rng.uniform(-120.0, -80.0)
    hu[muscle] = rng.uniform(35.0, 55.0)
    inner = _ellipse(shape, centre, (a - fat - 0.05, b - fat - 0.06), angle)
    hu[inner] = rng.uniform(-100.0, -60.0)  # visceral fat
    chest = rng.random() < 0.5
    if chest:
        for side in (-1.0, 1.0):
            lc = (centre[0] - 0.05, centre[1] + side * b * rng.uniform(0.4, 0.5))
            lung = _ellipse(shape, lc, (a * rng.uniform(0.6, 0.75), b * rng.uniform(0.3, 0.4)),
                            rng.uniform(-0.2, 0.2)) & inner
            hu[lung] = rng.uniform(-880.0, -780.0)
            vessels = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > 1.6
            hu[lung & vessels] = rng.uniform(-100.0, 40.0)
            for _ in range(rng.integers(0, 2)):  # nodules
                nc = (lc[0] + rng.uniform(-0.2, 0.2), lc[1] + rng.uniform(-0.1, 0.1))
                r = rng.uniform(0.015, 0.05)
                hu[_ellipse(shape, nc, (r, r), 0.0) & lung] = rng.uniform(-50.0, 60.0)
        hc = (centre[0] - 0.1, centre[1] + rng.uniform(-0.1, 0.1))
        hu[_ellipse(shape, hc, (a * 0.35, b * 0.25), rng.uniform(0, 1))] = rng.uniform(30, 50)
    else:
        for _ in range(rng.integers(2, 5)):  # organs
            oc = (centre[0] + rng.uniform(-0.4, 0.2) * a, centre[1] + rng.uniform(-0.6, 0.6) * b)
            axes = (rng.uniform(0.1, 0.3) * a, rng.uniform(0.1, 0.35) * b)
            hu[_ellipse(shape, oc, axes, rng.uniform(0, np.pi)) & inner] = rng.uniform(20, 75)
            for _ in range(rng.integers(0, 2)):  # lesions in the organ
                lc = (oc[0] + rng.uniform(-0.5, 0.5) * axes[0],
                      oc[1] + rng.uniform(-0.5, 0.5) * axes[1])
                r = rng.uniform(0.01, 0.05)
                hu[_ellipse(shape, lc, (r, r), 0.0) & inner] += rng.uniform(-40.0, 40.0)
    # vertebra (body + posterior elements) and ribs
    vc = (centre[0] + a * 0.55, centre[1])
    hu[_ellipse(shape, vc, (a * 0.16, a * 0.16), 0.0)] = rng.uniform(180.0, 400.0)
    hu[_ellipse(shape, vc, (a * 0.16, a * 0.16), 0.0)
       & ~_ellipse(shape, vc, (a * 0.13, a * 0.13), 0.0)] = rng.uniform(700.0, 1300.0)
    hu[_ellipse(shape, (vc[0] + a * 0.22, vc[1]), (a * 0.1, a * 0.05), 0.0)] = rng.uniform(
        500.0, 1100.0)
    for k in range(rng.integers(4, 9)):
        t = rng.uniform(0.3, 2.8) if k % 2 else rng.uniform(-2.8, -0.3)
        rc = (centre[0] + (a - fat - 0.02) * np.cos(t) * 0.97,
              centre[1] + (b - fat - 0.02) * np.sin(t) * 0.97)
        hu[_ellipse(shape, rc, (0.025, 0.04), t)] = rng.uniform(500.0, 1200.0)
    for _ in range(rng.integers(1, 3)):  # aorta / vessels with contrast
        ac = (vc[0] - a * 0.3, centre[1] + rng.uniform(-0.12, 0.12))
        r = rng.uniform(0.04, 0.07)
        hu[_ellipse(shape, ac, (r, r), 0.0)] = rng.uniform(40.0, 350.0)
    return _finish(hu, body, rng)


#: name → (phantom drawer, typical pixel spacing range in mm at 256 pixels).
PHANTOMS: dict[str, tuple[Callable[[int, np.random.Generator], FloatArray],
                          tuple[float, float]]] = {
    "shepp_logan": (shepp_logan_hu, (0.7, 0.9)),
    "head": (random_head, (0.7, 1.0)),
    "body": (random_body, (1.0, 1.5)),
}


def real_slice_hu(dataset: object) -> FloatArray:
    """The pixels of a real CT dataset in HU (Rescale Slope/Intercept applied)."""
    import pydicom.dataset

    assert isinstance(dataset, pydicom.dataset.Dataset)
    stored = dataset.pixel_array.astype(np.float64)
    slope = float(dataset.get("RescaleSlope", 1.0))
    intercept = float(dataset.get("RescaleIntercept", 0.0))
    return np.asarray(stored * slope + intercept)


def simulate_low_dose(hu: FloatArray, pixel_mm: float, photons: float,
                      rng: np.random.Generator) -> FloatArray:
    """``hu`` as a CT scan with ``photons`` incident photons per ray would show it (in HU).

    Poisson noise on the transmitted counts of a parallel-beam sinogram (as many angles over
    180° as the image has columns), reconstructed by filtered back projection (ramp filter) and
    added to ``hu``. Pixels below air (e.g. padding outside the reconstruction circle) count as
    air. Non-square images are padded with air.
    """
    return noise_sweep(hu, pixel_mm, [photons], rng)[0]


def noise_sweep(hu: FloatArray, pixel_mm: float, photon_levels: list[float],
                rng: np.random.Generator) -> list[FloatArray]:
    """Several low-dose versions of one slice, sharing its forward projection (cheaper)."""
    rows, cols = hu.shape
    n = max(rows, cols)
    mu = np.full((n, n), 0.0)
    r0, c0 = (n - rows) // 2, (n - cols) // 2
    mu[r0:r0 + rows, c0:c0 + cols] = (MU_WATER_PER_MM * (1.0 + np.clip(hu, AIR_HU, None) / 1000.0)
                                      * pixel_mm)
    theta = np.linspace(0.0, 180.0, n, endpoint=False)
    sinogram = radon(mu, theta, circle=False)
    out = []
    for photons in photon_levels:
        counts = np.maximum(rng.poisson(photons * np.exp(-sinogram)), 1.0)
        delta = -np.log(counts / photons) - sinogram
        noise = iradon(delta, theta, circle=False, filter_name="ramp", output_size=n)
        noise_hu = noise / pixel_mm / MU_WATER_PER_MM * 1000.0
        out.append(np.asarray(hu + noise_hu[r0:r0 + rows, c0:c0 + cols]))
    return out
