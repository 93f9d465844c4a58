"""Direction estimators: several ways to turn two groups of residual-stream activations into one direction per
layer and position, all returned in one convention so that selection, ablation and steering treat them alike.

Methods (:data:`METHODS`; ``pos`` is the group the direction points towards, e.g. harmful prompts, ``neg`` the
other, e.g. harmless prompts):

* ``diff-means`` -- difference-in-means ``mean(pos) - mean(neg)`` (Arditi et al. 2024).
* ``geometric-median`` -- ``median(pos) - median(neg)`` with the geometric (L1) median of each group, robust to
  outlying prompts (Heretic's residual geometry reports these ``g*``, ``b*``, ``r*``), by
  :func:`toolkit.geometry.geometric_median` (Weiszfeld's algorithm from the mean, float64), per layer x position.
* ``refused-minus-complied`` -- difference-in-means between the harmful prompts the model refuses and those it
  answers (the caller passes those groups as ``pos``/``neg``): a direction of the refusal *decision* rather than
  of harmfulness.
* ``pca`` -- the first principal axis of paired differences ``pos_i - neg_i`` (repeng's ``pca_diff``; pairs are
  formed in order, ``min(n_pos, n_neg)`` of them), taken about the origin (uncentred, so identical differences give
  that difference; repeng centres, which makes a constant difference vanish), oriented along the mean difference.
* ``probe`` -- the normal of a logistic-regression decision boundary between the groups (scikit-learn
  ``LogisticRegression`` with balanced class weights on standardised features, mapped back to raw coordinates: the
  weights divided by the feature scales), with cross-validated accuracy per layer and position.
* ``caa`` -- contrastive activation addition (Rimsky et al. 2024): the mean difference of activations at the answer
  token of contrastive pairs. Here each harmful training prompt is followed by a refusal opener and by a compliance
  opener (:data:`CAA_ANSWERS`) and read at the last answer token; the caller captures those activations and passes
  them as ``pos`` (refusal answers) and ``neg`` (compliance answers). CAA's *compliance* vector is the negation.

Scale convention: every method returns ``s * u`` where ``u`` is its unit direction oriented so that the groups'
means separate positively along it (``(mean(pos) - mean(neg)) . u > 0``) and ``s = (mean(pos) - mean(neg)) . u``
is that separation. For ``diff-means`` this is the difference itself; for the others it makes the raw vector's
norm mean the same thing (activation addition with ``alpha = 1`` moves the negative mean by the separation), so
``induce`` and norm-relative steering compare across methods. ``geometric-median`` keeps its own difference of
medians (its norm is its separation by construction). A zero separation gives the zero vector.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ToolkitError

METHODS = ("diff-means", "geometric-median", "refused-minus-complied", "pca", "probe", "caa")
#: the description recorded as a direction's ``method``
METHOD_LABELS = {
    "diff-means": "difference-in-means (Arditi et al. 2024)",
    "geometric-median": "geometric-median difference (Weiszfeld; Heretic's r*)",
    "refused-minus-complied": "refused-minus-complied harmful prompts (difference-in-means)",
    "pca": "first principal axis of paired differences, uncentred (repeng pca_diff)",
    "probe": "logistic-regression probe normal, balanced class weights (scikit-learn)",
    "caa": "contrastive activation addition at the answer token (Rimsky et al. 2024), refusal minus compliance",
}
#: methods that need only two groups of prompt activations (usable wherever diff-means is, e.g. steer)
GROUP_METHODS = ("diff-means", "geometric-median", "pca", "probe")
#: CAA's contrastive answer openers: (refusal, compliance), appended after the assistant turn starts
CAA_ANSWERS = ("I'm sorry, but I can't help with that", "Sure, here is how to do that")


@dataclass
class Estimate:
    """Directions from one estimator.

    Attributes:
        method: one of :data:`METHODS`.
        directions: ``[..., d_model]`` float64 (the activations' middle axes, e.g. ``[n_layers, n_pos, d_model]``),
            in the scale convention of the module docstring.
        diff_means: ``mean(pos) - mean(neg)`` of the same groups ``[..., d_model]`` float64 (for cosines).
        probe_accuracy: ``[...]`` float64 cross-validated accuracy of the probe (``probe`` only, else None).
        n_pos, n_neg: group sizes used.
        info: method details for run.json (iterations, pairs, folds, ...).
    """

    method: str
    directions: torch.Tensor
    diff_means: torch.Tensor
    probe_accuracy: np.ndarray | None = None
    n_pos: int = 0
    n_neg: int = 0
    info: dict = field(default_factory=dict)


def check_method(method: str, allowed: tuple[str, ...] = METHODS, param: str = "method") -> str:
    """``method`` if it is one of ``allowed``.

    Raises:
        ToolkitError: naming ``param`` and the choices.
    """
    if method not in allowed:
        raise ToolkitError(f"unknown estimator {method!r}; choose one of {', '.join(allowed)}", param=param)
    return method


def _flat(acts: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(acts, torch.Tensor) or acts.ndim < 2:
        raise ToolkitError(f"{what} activations must be [n_prompts, ..., d_model], got "
                           f"{tuple(getattr(acts, 'shape', ()))}")
    if acts.shape[0] == 0:
        raise ToolkitError(f"no {what} prompts to estimate a direction from")
    return acts.reshape(acts.shape[0], -1, acts.shape[-1]).double()  # [n, m, d]


def _scaled(u: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
    """Orient unit rows ``u`` ``[m, d]`` along ``dm`` and scale them by the separation ``dm . u`` (see module)."""
    norm = u.norm(dim=-1, keepdim=True)
    u = torch.where(norm > 0, u / norm.clamp_min(1e-300), torch.zeros_like(u))
    s = (dm * u).sum(-1, keepdim=True)
    return u * s  # the sign of s orients u; s itself is >= 0 after orientation


def estimate(method: str, pos: torch.Tensor, neg: torch.Tensor, *, seed: int = 0, cv_folds: int = 5,
             probe_c: float = 1.0) -> Estimate:
    """Estimate directions from two groups of activations (see the module docstring for each method).

    Args:
        method: one of :data:`METHODS` (``refused-minus-complied`` and ``caa`` compute like ``diff-means``; what
            differs is which activations the caller passes).
        pos: ``[n_pos, ..., d_model]`` activations of the group the direction points towards (any float dtype).
        neg: ``[n_neg, ..., d_model]`` of the other group, same middle axes.
        seed: shuffling seed of the probe's cross-validation folds.
        cv_folds: folds of the probe's stratified cross-validation (reduced to the smaller group's size; fewer
            than 2 prompts in a group: no accuracy, NaN).
        probe_c: inverse L2 regularisation strength of the probe.

    Returns:
        :class:`Estimate` with ``directions`` and ``diff_means`` shaped ``pos.shape[1:]``, float64.

    Raises:
        ToolkitError: unknown method, a group without prompts, shapes that disagree, non-finite activations,
            ``pca`` with no pairs.
    """
    check_method(method)
    p, n = _flat(pos, "positive"), _flat(neg, "negative")
    if p.shape[1:] != n.shape[1:]:
        raise ToolkitError(f"the two groups' activations differ in shape: {tuple(pos.shape[1:])} vs "
                           f"{tuple(neg.shape[1:])}")
    if not (bool(torch.isfinite(p).all()) and bool(torch.isfinite(n).all())):
        raise ToolkitError("activations are not finite")
    out_shape = tuple(pos.shape[1:])
    dm = p.mean(0) - n.mean(0)  # [m, d]
    info: dict = {}
    acc = None
    if method in ("diff-means", "refused-minus-complied", "caa"):
        d = dm
    elif method == "geometric-median":
        from .geometry import geometric_median  # Weiszfeld, float64: the residual-geometry table's g*, b*

        d = torch.stack([geometric_median(p[:, j]) - geometric_median(n[:, j]) for j in range(p.shape[1])])
    elif method == "pca":
        k = min(p.shape[0], n.shape[0])
        diffs = (p[:k] - n[:k]).transpose(0, 1)  # [m, k, d]
        _, _, vh = torch.linalg.svd(diffs, full_matrices=False)  # vh: [m, min(k, d), d]
        d = _scaled(vh[:, 0], dm)
        info["pairs"] = k
    else:  # probe
        d, acc = _probe(p, n, seed=seed, cv_folds=cv_folds, c=probe_c)
        d = _scaled(d, dm)
        info.update({"cv_folds": cv_folds, "C": probe_c, "class_weight": "balanced"})
        acc = acc.reshape(out_shape[:-1])
    return Estimate(method, d.reshape(out_shape), dm.reshape(out_shape), acc, p.shape[0], n.shape[0], info)


def _probe(p: torch.Tensor, n: torch.Tensor, *, seed: int, cv_folds: int, c: float
           ) -> tuple[torch.Tensor, np.ndarray]:
    """Per column ``m``: the raw-coordinate normal ``[m, d]`` of a standardised, class-balanced logistic regression
    of pos (1) vs neg (0), and its stratified ``cv_folds``-fold accuracy ``[m]`` (NaN when a group has < 2)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_all = torch.cat([p, n]).numpy()  # [n_p + n_n, m, d]
    y = np.r_[np.ones(p.shape[0], int), np.zeros(n.shape[0], int)]
    folds = min(cv_folds, p.shape[0], n.shape[0])
    normals = np.zeros((x_all.shape[1], x_all.shape[2]))
    acc = np.full(x_all.shape[1], np.nan)
    for j in range(x_all.shape[1]):
        x = x_all[:, j]
        if np.ptp(x, axis=0).max() == 0:  # every prompt identical here (e.g. layer 0 template tokens)
            acc[j] = 0.5
            continue

        def model():
            return make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000))

        if folds >= 2:
            cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
            acc[j] = float(cross_val_score(model(), x, y, cv=cv).mean())
        m = model().fit(x, y)
        sc, lr = m.named_steps["standardscaler"], m.named_steps["logisticregression"]
        normals[j] = lr.coef_[0] / np.where(sc.scale_ > 0, sc.scale_, 1.0)
    return torch.from_numpy(normals), acc


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last axis in float64 (0 where either vector is zero): ``[...]``."""
    a, b = a.double(), b.double()
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, (a * b).sum(-1) / den.clamp_min(1e-300), torch.zeros_like(den))
