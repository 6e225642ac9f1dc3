"""Procedural synthetic chest radiographs (PA view) with multi-label findings.

Nothing here is real patient data and nothing is downloaded: every image is drawn from a seeded
random generator, in the display convention of MONOCHROME2 (bright = attenuating: bone, heart,
fluid; dark = air), scaled to [0, 1] the same way dicom_node.infer.preprocess scales a real image.

What is drawn, in thorax coordinates ``u`` (−1 … 1 across the inner chest wall, patient right on
the image left as in a PA film) and ``v`` (0 at the lung apices, 1 at the costophrenic angles):

- soft tissue of the body, shoulders and neck, on an air background;
- two lung fields with rounded apices and diaphragm domes (the right one a little higher);
- mediastinum, spine with disc spaces, trachea, aortic knob, hilar shadows and lung markings;
- posterior and anterior ribs and the clavicles; optional breast shadows;
- the cardiac silhouette, whose transverse diameter sets the cardiothoracic ratio (CTR);
- acquisition effects: position, size, rotation, exposure gradient, gamma, blur, quantum noise,
  collimator edges and a side marker.

Findings (independent labels, in this order — :data:`FINDINGS`):

- ``cardiomegaly``: CTR 0.53–0.70 (normal hearts are drawn with CTR 0.38–0.50);
- ``pleural_effusion``: basal opacity with a meniscus that blunts the costophrenic angle, on one
  side or both, from a small blunting up to a third of the lung height;
- ``pulmonary_nodule``: one to three round opacities in a lung, about 1.3–2.6 cm across for a
  29 cm wide chest.

Only numpy is used, so tests can draw a few fresh images to check the shipped weights.
"""

from __future__ import annotations

import numpy as np

FINDINGS = ("cardiomegaly", "pleural_effusion", "pulmonary_nodule")

#: Normal and enlarged cardiothoracic ratio ranges (the gap between them keeps labels unambiguous).
CTR_NORMAL = (0.38, 0.50)
CTR_ENLARGED = (0.53, 0.70)


def _sig(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """Row-normalised Gaussian blur as a matrix: ``B @ img @ B.T`` blurs a square image."""
    idx = np.arange(size)
    w = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / max(sigma, 1e-3)) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def _smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length ``scale`` pixels."""
    b = _blur_matrix(size, scale)
    f = b @ rng.standard_normal((size, size)) @ b.T
    return (f - f.mean()) / (f.std() + 1e-8)


def draw_chest(rng: np.random.Generator, size: int, labels: np.ndarray) -> np.ndarray:
    """Draw one synthetic PA chest radiograph with the findings in ``labels`` (0/1 per FINDINGS)."""
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / np.float32(s)
    # --- patient position and size --------------------------------------------------------
    half_w = rng.uniform(0.32, 0.45)
    cx = 0.5 + rng.uniform(-0.05, 0.05)
    y_top = rng.uniform(0.06, 0.16)
    y_dia = min(y_top + rng.uniform(0.58, 0.72), 0.92)
    theta = float(np.deg2rad(rng.uniform(-4.0, 4.0)))
    cy = 0.5 * (y_top + y_dia)
    xr = np.cos(theta) * (xx - cx) - np.sin(theta) * (yy - cy)
    yr = np.sin(theta) * (xx - cx) + np.cos(theta) * (yy - cy) + cy
    u = xr / half_w
    v = (yr - y_top) / (y_dia - y_top)
    pu = 1.0 / (s * half_w)  # one pixel in u units
    pv = 1.0 / (s * (y_dia - y_top))  # one pixel in v units
    au = np.abs(u)

    # --- body outline: chest wall, shoulders, neck ------------------------------------------
    wall = 1.12 + rng.uniform(-0.03, 0.06)
    shoulder = wall + rng.uniform(0.25, 0.45) * _sig((0.02 - v) / 0.05)
    outline = np.where(v < -0.22, 0.38, shoulder)
    body = _sig((outline - au) / (2.0 * pu)) * _sig((v + 0.9) / pv)
    soft = rng.uniform(0.50, 0.62)
    img = 0.03 + (soft - 0.03) * body

    # --- lungs -------------------------------------------------------------------------------
    lateral = 0.94 - 0.55 * (np.clip(0.42 - v, 0.0, None) / 0.42) ** 2
    medial = rng.uniform(0.11, 0.16) + 0.05 * _sig((0.3 - v) / 0.05)
    right_high = rng.uniform(0.02, 0.06)  # the right hemidiaphragm (image left) sits higher
    dome = rng.uniform(0.07, 0.14)
    t_dome = np.clip((au - 0.5) / 0.45, -1.0, 1.0)
    diaphragm = 1.0 - dome * (1.0 - t_dome**2) - np.where(u < 0, right_high, 0.0)
    lung = (
        _sig((au - medial) / pu)
        * _sig((lateral - au) / pu)
        * _sig(v / pv)
        * _sig((diaphragm - v) / pv)
    )

    # --- heart (CTR is the label-bearing parameter) --------------------------------------
    ctr = rng.uniform(*(CTR_ENLARGED if labels[0] else CTR_NORMAL))
    a = ctr * 0.94  # semi-axis in u units: 2a / (2 * 0.94 inner thorax) = ctr
    b = rng.uniform(0.20, 0.26) + 0.2 * (a - 0.4)
    hu = 0.25 * a + rng.uniform(-0.04, 0.04)
    hv = rng.uniform(0.70, 0.78)
    # upper half an ellipse, lower half a skirt of the full width that sits on the diaphragm
    rho = np.sqrt(((u - hu) / a) ** 2 + (np.clip(v - hv, None, 0.0) / b) ** 2)
    rho = rho + np.clip(v - hv, 0.0, None) * 0.6
    heart = _sig((1.0 - rho) / (1.5 * pu / a))
    # aortic knob and hila
    knob = _sig((1.0 - np.hypot((u - 0.2) / 0.08, (v - 0.22) / 0.07)) / 0.15)
    hila = sum(
        np.exp(-(((u - sx * 0.24) / 0.12) ** 2 + ((v - 0.45) / 0.12) ** 2)) for sx in (-1, 1)
    )

    lung_dark = rng.uniform(0.18, 0.38)
    lung_mask = lung * (1.0 - heart) * (1.0 - 0.85 * knob)
    markings = 0.35 * _smooth_field(rng, s, 1.2) + 0.65 * _smooth_field(rng, s, 3.0)
    texture = lung_dark * (1.0 - 0.08 * markings - 0.35 * hila)

    # --- pleural effusion: basal opacity with a meniscus ------------------------------------
    fluid = np.zeros_like(img)
    if labels[1]:
        sides = [(-1,), (1,), (-1, 1)][rng.choice(3, p=[0.35, 0.3, 0.35])]
        for side in sides:
            h = rng.uniform(0.05, 0.32)
            t = np.clip((au - medial) / (lateral - medial), 0.0, 1.0)
            surface = 1.0 - h * (0.3 + 1.3 * t**2)
            on_side = _sig(side * u / pu)
            fluid = np.maximum(fluid, on_side * _sig((v - surface) / (2.5 * pv)))
        fluid *= rng.uniform(0.75, 1.0)
    # effusion fills the lung base (and hides that hemidiaphragm)
    below = _sig((v - diaphragm) / pv) * _sig((lateral - au) / pu) * _sig((au - medial) / pu)
    lung_mask = lung_mask * (1.0 - fluid)
    img = img - texture * lung_mask
    img = img + 0.04 * fluid * (1.0 - below)

    # --- nodules ------------------------------------------------------------------------------
    if labels[2]:
        for _ in range(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15])):
            for _try in range(50):
                nu = rng.uniform(-0.85, 0.85)
                nv = rng.uniform(0.12, 0.8)
                iu = int(np.clip((cx + nu * half_w) * s, 0, s - 1))
                iv = int(np.clip((y_top + nv * (y_dia - y_top)) * s, 0, s - 1))
                if lung_mask[iv, iu] > 0.8:
                    break
            r = rng.uniform(0.045, 0.09)
            d = np.hypot(u - nu, (v - nv) * (y_dia - y_top) / half_w)
            img = img + rng.uniform(0.10, 0.22) * _sig((r - d) / (1.2 * pu))

    # --- bones: spine, ribs, clavicles ---------------------------------------------------------
    bone = rng.uniform(0.10, 0.18)
    spine = _sig((0.085 - au) / pu) * _sig((v + 0.9) / pv)
    discs = 0.25 * (0.5 + 0.5 * np.cos(2 * np.pi * v / 0.085))
    img = img + bone * 0.6 * spine * (1.0 - discs)
    trachea = _sig((0.035 - au) / pu) * _sig((0.32 - v) / pv)
    img = img - 0.08 * trachea
    start = rng.uniform(-0.05, 0.02)
    spacing = rng.uniform(0.085, 0.10)
    # eleven posterior ribs (down and out from the spine) and fainter anterior ribs (down and in),
    # drawn as a periodic pattern: distance to the nearest rib centre line
    post = (v - start + 0.12 * au - 0.25 * au**3) / spacing
    ant = (v - start - 0.28 + 0.22 * au) / spacing
    ribs = np.exp(-0.5 * ((post - np.round(post)) * spacing / 0.016) ** 2) * (post > -0.5) * (
        post < 10.5
    ) + 0.5 * np.exp(-0.5 * ((ant - np.round(ant)) * spacing / 0.02) ** 2) * (ant > -0.5) * (
        ant < 10.5
    ) * _sig((au - 0.2) / 0.05)
    ribs *= _sig((wall - au) / pu) * _sig((au - 0.09) / pu) * _sig((0.95 - v) / (3 * pv))
    img = img + bone * 0.45 * np.clip(ribs, 0.0, 1.3)
    for sx in (-1, 1):
        cl = 0.02 - 0.12 * (sx * u - 0.15)
        on = _sig((sx * u - 0.12) / pu) * _sig((0.95 - sx * u) / pu)
        img = img + bone * np.exp(-0.5 * ((v - cl) / 0.022) ** 2) * on
    if rng.random() < 0.4:  # breast shadows over the lung bases
        for sx in (-1, 1):
            breast = _sig((1.0 - np.hypot((u - sx * 0.55) / 0.42, (v - 0.98) / 0.3)) / 0.08)
            img = img + rng.uniform(0.03, 0.07) * breast * body

    # --- acquisition --------------------------------------------------------------------------
    img = img * (1.0 + rng.uniform(-0.12, 0.12) * (yy - 0.5) + rng.uniform(-0.1, 0.1) * (xx - 0.5))
    if rng.random() < 0.35:  # collimator edges look white (unexposed)
        for edge, width in (
            (yy, rng.uniform(0, 0.08)),
            (1 - yy, rng.uniform(0, 0.06)),
            (xx, rng.uniform(0, 0.06)),
            (1 - xx, rng.uniform(0, 0.06)),
        ):
            img = np.maximum(img, 0.95 * _sig((width - edge) * s))
    if rng.random() < 0.5:  # side marker
        mx, my = rng.uniform(0.05, 0.2), rng.uniform(0.05, 0.25)
        if rng.random() < 0.5:
            mx = 1 - mx
        marker = (np.abs(xx - mx) < 0.02) & (np.abs(yy - my) < 0.025)
        img = np.where(marker, 0.97, img)
    img = np.clip(img, 0.0, None) ** rng.uniform(0.75, 1.35)
    sigma = rng.uniform(0.4, 1.1)
    blur = _blur_matrix(s, sigma)
    img = blur @ img @ blur.T
    img = img + rng.uniform(0.005, 0.03) * rng.standard_normal(img.shape)
    lo, hi = img.min(), img.max()
    return ((img - lo) / (hi - lo + 1e-8)).astype(np.float32)


def draw_sample(
    seed: int, index: int, size: int, prevalence: float
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``index`` of the stream ``seed``: its own generator, so any subset is reproducible."""
    rng = np.random.default_rng([seed, index])
    labels = (rng.random(len(FINDINGS)) < prevalence).astype(np.float32)
    return draw_chest(rng, size, labels), labels


def make_dataset(
    seed: int, start: int, stop: int, size: int, prevalence: float = 0.35
) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``start``…``stop - 1`` of stream ``seed``: images (n, size, size, 1), labels."""
    n = stop - start
    images = np.empty((n, size, size, 1), dtype=np.float32)
    labels = np.empty((n, len(FINDINGS)), dtype=np.float32)
    for i in range(n):
        images[i, :, :, 0], labels[i] = draw_sample(seed, start + i, size, prevalence)
    return images, labels
