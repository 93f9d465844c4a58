"""2-D projections of residual-stream activations, per layer (the maths; the pictures, a PNG per layer and an
animated GIF, are drawn by :func:`toolkit.plots.draw_frames` and :func:`toolkit.plots.write_gif`).

Points are activations of several prompt sets at one hook site and prompt position (e.g. ``resid_pre`` at the
last prompt token, where Heretic reads residuals), one ``[n_points, d_model]`` matrix per layer. Each layer is
projected to 2-D on the union of all sets' points by

* **PaCMAP** (Wang, Huang, Rudin & Shaposhnik 2021, "Understanding How Dimension Reduction Tools Work: An
  Empirical Approach to Deciphering t-SNE, UMAP, TriMap, and PaCMAP for Data Visualization", JMLR 22(201)),
  through the ``pacmap`` package. Its own preprocessing applies: with ``d_model > 100`` it centres the points and
  reduces them to 100 dimensions with a truncated SVD (``apply_pca=True``, its default); with ``d_model <= 100``
  it rescales all coordinates by one global min-max and centres them. Nothing else is standardised. As in
  Heretic's residual animation (``heretic/analyzer.py``: PaCMAP per layer, each layer initialised with the
  previous layer's embedding, rotated so the line from the harmless to the harmful cluster is horizontal with the
  harmless cluster on the left, frames joined into a GIF), every layer after the first is initialised with the
  previous layer's oriented embedding, so consecutive frames move smoothly; or by
* **PCA** (scikit-learn, exact SVD of the centred points; no scaling): ``x`` is the first principal component,
  ``y`` the second.

Orientation (:func:`orient`) puts the first set (the reference, e.g. harmless) on the left. The separation of the
sets is measured per layer with the silhouette coefficient (Rousseeuw 1987; scikit-learn ``silhouette_score``,
Euclidean), both of the 2-D points (what the picture shows) and of the full ``d_model``-dimensional activations
(which does not depend on the projection).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import ToolkitError

METHODS = ("pacmap", "pca")
# PaCMAP scales distances by sigma_i, the mean distance of point i to its 4th-6th nearest neighbours, so every
# point needs 6 other points.
PACMAP_MIN_POINTS = 7
PACMAP_NEIGHBORS = 10  # PaCMAP's default for fewer than 10,000 points (Heretic uses 30)
PCA_MIN_POINTS = 3


@dataclass
class Frame:
    """One layer's projection.

    Attributes:
        layer: block index.
        points: oriented 2-D coordinates ``[n_points, 2]`` (PCA: in the residual stream's units; PaCMAP: unitless).
        silhouette_2d: silhouette coefficient of the 2-D points by set, in [-1, 1] (NaN where undefined).
        silhouette_full: silhouette coefficient of the ``d_model``-dimensional activations by set (NaN where
            undefined).
        degenerate: every activation at this layer is identical (all points are put at the origin).
        info: method details: ``explained_variance_ratio`` ``[2]`` (PCA) or ``n_neighbors``, ``n_mid_near``,
            ``n_further``, ``svd_to_100`` (PaCMAP).
    """

    layer: int
    points: np.ndarray
    silhouette_2d: float
    silhouette_full: float
    degenerate: bool = False
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ checks
def _check_points(x, name: str = "points", dims: int | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or (dims is not None and a.shape[1] != dims):
        want = f"[n_points, {dims}]" if dims else "[n_points, n_dims]"
        raise ToolkitError(f"{name} must be a {want} array, got shape {tuple(a.shape)}")
    if not np.isfinite(a).all():
        raise ToolkitError(f"{name} contain NaN or infinite values")
    return a


def _check_groups(groups, n: int) -> np.ndarray:
    g = np.asarray(groups)
    if g.ndim != 1 or len(g) != n:
        raise ToolkitError(f"groups must have one entry per point ({n}), got shape {tuple(g.shape)}")
    if not np.issubdtype(g.dtype, np.integer) or (len(g) and g.min() < 0):
        raise ToolkitError("groups must be non-negative integers (0 = the reference set)")
    present = np.unique(g)
    if len(present) < 2 or not (g == 0).any():
        raise ToolkitError("need points of the reference set (group 0) and of at least one other set")
    return g


def check_method(method: str) -> str:
    """Validate a projection method name.

    Raises:
        ToolkitError: not one of :data:`METHODS`.
    """
    if method not in METHODS:
        raise ToolkitError(f"unknown projection method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def min_points(method: str) -> int:
    """Fewest points per layer that ``method`` can project (PaCMAP 7, PCA 3).

    Raises:
        ToolkitError: unknown method.
    """
    return PACMAP_MIN_POINTS if check_method(method) == "pacmap" else PCA_MIN_POINTS


# ------------------------------------------------------------------------------------------- projections
def pacmap_pairs(n_neighbors: int) -> tuple[int, int, int]:
    """PaCMAP's pair counts per point for ``n_neighbors`` near pairs: ``(near, mid-near, further)`` with its
    default ratios 0.5 and 2 (``round`` as in the ``pacmap`` package)."""
    return n_neighbors, round(n_neighbors * 0.5), round(n_neighbors * 2.0)


def pacmap_neighbors(n_points: int, requested: int = PACMAP_NEIGHBORS) -> int:
    """The number of near neighbours PaCMAP uses for ``n_points`` points: ``requested``, lowered until the near,
    mid-near and further pairs of a point (:func:`pacmap_pairs`) fit among the other ``n_points - 1`` points
    (so the package never reorganises them itself).

    Raises:
        ToolkitError: ``requested < 1``, or fewer than :data:`PACMAP_MIN_POINTS` points.
    """
    if requested < 1:
        raise ToolkitError(f"PaCMAP needs at least 1 neighbour, got {requested}")
    if n_points < PACMAP_MIN_POINTS:
        raise ToolkitError(f"PaCMAP needs at least {PACMAP_MIN_POINTS} points per layer, got {n_points}; "
                           "use more prompts or `method` pca")
    k = requested
    while k > 1 and sum(pacmap_pairs(k)) >= n_points:
        k -= 1
    return k


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run BLAS (numpy, scipy, scikit-learn) and numba (PaCMAP) on one thread inside the block, and give PyTorch
    back its thread count afterwards (with a random state PaCMAP sets faiss's OpenMP threads to 1, which
    PyTorch's CPU kernels share).

    Projections of a few hundred points gain nothing from threads, and on a busy machine their thread pools
    spin against other processes: on this 2-core machine, under load, PaCMAP of 320 x 896 points took 2-11 s
    with the default threads and 0.2-0.3 s on one.
    """
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    threads, nb = torch.get_num_threads(), numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(nb)
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _pacmap_quiet() -> Iterator[None]:
    """Silence the ``pacmap`` package's logger (it warns whenever a random state is set)."""
    log = logging.getLogger("pacmap.pacmap")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def project_pacmap(x, seed: int = 0, n_neighbors: int = PACMAP_NEIGHBORS,
                   init: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """PaCMAP embedding of ``x`` ``[n_points, n_dims]`` into 2-D (Wang et al. 2021, JMLR; ``pacmap`` package).

    Args:
        x: the points (float; converted to float32 as PaCMAP requires).
        seed: PaCMAP's ``random_state`` (pair sampling, the truncated SVD); the same seed gives the same output.
        n_neighbors: near neighbours requested; lowered for few points by :func:`pacmap_neighbors`.
        init: starting embedding ``[n_points, 2]`` (PaCMAP standardises it and shrinks it by 1e-4), e.g. the
            previous layer's; default PaCMAP's PCA initialisation.

    Returns:
        ``(embedding [n_points, 2] float64, info)`` with ``n_neighbors``, ``n_mid_near``, ``n_further`` and
        ``svd_to_100`` (whether PaCMAP reduced the points to 100 dimensions first, i.e. ``n_dims > 100``).

    Raises:
        ToolkitError: not a finite 2-D array, too few points, or ``init`` of the wrong shape.
    """
    a = _check_points(x)
    k = pacmap_neighbors(len(a), n_neighbors)
    if init is not None:
        init = _check_points(init, "init", 2).astype(np.float32)
        if len(init) != len(a):
            raise ToolkitError(f"init has {len(init)} points, expected {len(a)}")
    import pacmap

    with _pacmap_quiet(), single_threaded():
        reducer = pacmap.PaCMAP(n_components=2, n_neighbors=k, random_state=int(seed))
        y = reducer.fit_transform(a.astype(np.float32), init="pca" if init is None else init)
    near, mid, far = pacmap_pairs(k)
    info = {"n_neighbors": near, "n_mid_near": mid, "n_further": far, "svd_to_100": bool(a.shape[1] > 100)}
    return np.asarray(y, dtype=np.float64), info


def project_pca(x, seed: int = 0) -> tuple[np.ndarray, dict]:
    """First two principal components of ``x`` ``[n_points, n_dims]`` (scikit-learn ``PCA``, exact SVD of the
    centred points, no scaling).

    Returns:
        ``(scores [n_points, 2] float64, info)`` with ``explained_variance_ratio`` ``[2]`` (shares of the total
        variance).

    Raises:
        ToolkitError: not a finite 2-D array, fewer than 3 points or fewer than 2 dimensions.
    """
    a = _check_points(x)
    if len(a) < PCA_MIN_POINTS or a.shape[1] < 2:
        raise ToolkitError(f"PCA to 2-D needs at least {PCA_MIN_POINTS} points of at least 2 dimensions, "
                           f"got {a.shape[0]} x {a.shape[1]}")
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, svd_solver="full", random_state=seed)
    y = pca.fit_transform(a)
    return y, {"explained_variance_ratio": [float(v) for v in pca.explained_variance_ratio_]}


def separation(x, groups) -> float:
    """Silhouette coefficient of the points ``x`` ``[n_points, n_dims]`` grouped by set
    (:func:`toolkit.geometry.silhouette`). 1: tight, well separated sets; 0: overlapping; < 0: points nearer
    another set.

    Returns:
        The coefficient, or NaN when it is undefined (all points identical, or not fewer sets than points).

    Raises:
        ToolkitError: malformed points or groups.
    """
    from .geometry import silhouette

    a = _check_points(x)
    return silhouette(a, _check_groups(groups, len(a)))


def orient(points, groups, *, rotate: bool = False, previous=None) -> np.ndarray:
    """Orient a 2-D projection so the reference set (group 0) is on the left.

    The points are first centred on their overall mean. Then

    * ``rotate=False`` (PCA, whose axes mean something): ``x`` is negated if the reference set's mean ``x`` is
      larger than the mean ``x`` of all other points, and ``y`` is negated if the second set's (the lowest group
      number after 0) mean ``y`` is below the reference set's, so the second set sits above. Negating either
      input axis gives the same output.
    * ``rotate=True`` (PaCMAP, whose axes are arbitrary; Heretic's orientation): the points are rotated so the
      line from the reference set's mean to the mean of all other points points along ``+x``. ``y`` is then
      negated if that makes it agree better with ``previous`` (``sum(y * y_previous) < 0``: no mirror jumps
      between consecutive frames), or, without ``previous``, if the points' third moment ``sum(y**3)`` is
      negative. Rotating or reflecting the input gives the same output.

    Args:
        points: ``[n_points, 2]``.
        groups: ``[n_points]`` integer set index per point, 0 = the reference set.
        rotate: rotate (True) or only flip axes (False).
        previous: the previous frame's oriented points ``[n_points, 2]`` (same points in the same order), used
            by ``rotate=True`` only.

    Returns:
        The oriented points ``[n_points, 2]`` float64 (a new array).

    Raises:
        ToolkitError: malformed points, groups or ``previous``.
    """
    y = _check_points(points, "points", 2)
    g = _check_groups(groups, len(y))
    y = y - y.mean(0)
    ref, rest = g == 0, g != 0
    if rotate:
        d = y[rest].mean(0) - y[ref].mean(0)
        norm = float(np.hypot(d[0], d[1]))
        if norm > 0:
            c, s = d / norm
            y = y @ np.array([[c, -s], [s, c]])  # rotates d onto +x
        if previous is not None:
            prev = _check_points(previous, "previous", 2)
            if len(prev) != len(y):
                raise ToolkitError(f"previous has {len(prev)} points, expected {len(y)}")
            flip = float(np.sum(y[:, 1] * prev[:, 1])) < 0
        else:
            flip = float(np.sum(y[:, 1] ** 3)) < 0
        if flip:
            y[:, 1] = -y[:, 1]
    else:
        if y[ref, 0].mean() > y[rest, 0].mean():
            y[:, 0] = -y[:, 0]
        second = g == np.min(g[rest])
        if y[second, 1].mean() < y[ref, 1].mean():
            y[:, 1] = -y[:, 1]
    return y + 0.0  # no negative zeros


def project_layers(acts, groups, layers: Sequence[int], method: str = "pacmap", *, seed: int = 0,
                   n_neighbors: int = PACMAP_NEIGHBORS, progress: Callable | None = None) -> list[Frame]:
    """Project every layer's activations to 2-D, oriented, with the sets' separation.

    Args:
        acts: ``[n_points, n_layers, d_model]`` activations (numpy or torch), layers in the order of ``layers``.
        groups: ``[n_points]`` set index per point, 0 = the reference set (drawn on the left).
        layers: the block index of each layer slice (labels only).
        method: ``pacmap`` (each layer after the first initialised with the previous oriented embedding,
            oriented with ``rotate=True``) or ``pca`` (independent per layer, oriented with ``rotate=False``).
        seed: PaCMAP's random state (PCA is deterministic).
        n_neighbors: PaCMAP near neighbours (lowered for few points, see :func:`pacmap_neighbors`).
        progress: called once per finished layer (e.g. a progress bar's ``update``).

    Returns:
        One :class:`Frame` per layer. A layer whose activations are all identical (e.g. ``resid_pre`` of block 0
        at a position holding the same token in every prompt) gets every point at the origin, silhouettes NaN.

    Raises:
        ToolkitError: unknown method, malformed shapes, non-finite activations, or too few points for the method.

    Runs single-threaded (:func:`single_threaded`).
    """
    check_method(method)
    a = np.asarray(acts.float().cpu().numpy() if hasattr(acts, "cpu") else acts, dtype=np.float64)
    if a.ndim != 3 or a.shape[1] != len(layers):
        raise ToolkitError(f"activations must be [n_points, {len(layers)} layers, d_model], got {tuple(a.shape)}")
    g = _check_groups(groups, a.shape[0])
    need = min_points(method)
    if a.shape[0] < need:
        raise ToolkitError(f"{method} needs at least {need} points per layer, got {a.shape[0]}"
                           + ("; use more prompts or `method` pca" if method == "pacmap" else ""))
    with single_threaded():
        return _project(a, g, layers, method, seed, n_neighbors, progress)


def _project(a: np.ndarray, g: np.ndarray, layers: Sequence[int], method: str, seed: int, n_neighbors: int,
             progress: Callable | None) -> list[Frame]:
    frames: list[Frame] = []
    previous = None
    for li, layer in enumerate(layers):
        x = a[:, li]
        if not np.isfinite(x).all():
            raise ToolkitError(f"activations at layer {layer} contain NaN or infinite values")
        if np.ptp(x, axis=0).max() == 0:
            frames.append(Frame(int(layer), np.zeros((len(x), 2)), float("nan"), float("nan"), True, {}))
        else:
            if method == "pca":
                y, info = project_pca(x, seed)
                y = orient(y, g)
            else:
                y, info = project_pacmap(x, seed, n_neighbors, init=previous)
                y = orient(y, g, rotate=True, previous=previous)
                previous = y
            frames.append(Frame(int(layer), y, separation(y, g), separation(x, g), False, info))
        if progress is not None:
            progress(1)
    return frames
