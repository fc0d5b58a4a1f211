"""How far a top-1 drop can be, not only how far it was: a one-sided upper confidence bound of the
drop from paired per-image outcomes, so that an accuracy budget is met only when the bound is.

The construction (exact, on the discordant pairs, as compare's McNemar test uses them). ``n``
images, each judged by the reference (source, float) model and by the engine: ``b`` lost (reference
right, engine wrong), ``c`` gained (the reverse), ``m = b + c`` discordant. With ``pi`` the chance
that an image is discordant and ``q`` the chance that a discordant image is a loss, the true drop is
``D = pi (2q - 1)`` (the concordant images cancel). ``alpha = 1 - confidence`` is split in two
(Bonferroni):

* ``pi_L``, ``pi_U``: the Clopper-Pearson lower and upper limits of ``pi`` from ``m`` of ``n``, each
  one-sided at ``alpha / 2``;
* ``q_U``: the Clopper-Pearson upper limit of ``q`` from ``b`` of ``m``, one-sided at ``alpha / 2``
  (given ``m``; ``q_U = 1`` when ``m = 0``);
* ``D_U = 100 max(pi_U (2 q_U - 1), pi_L (2 q_U - 1))`` points.

Why ``P(D > D_U) <= alpha`` although two limits of ``pi`` appear: the sign of the true ``D`` is
fixed. If ``D > 0`` (``q > 1/2``) and ``q <= q_U``, then ``2 q_U - 1 >= 2q - 1 > 0`` and ``D > D_U``
needs ``pi > pi_U``; if ``D <= 0`` and ``q <= q_U``, ``D > D_U`` needs ``2 q_U - 1 < 0`` and then
``pi < pi_L``. Either way only one limit of ``pi`` can fail, at most ``alpha / 2``, plus ``q > q_U``
at most ``alpha / 2`` (it holds for every ``m``, so unconditionally).

With no disagreement (``m = 0``) the bound is ``100 (1 - (alpha/2)^(1/n))``, about
``100 ln(2/alpha) / n``: 0.37 point on 1,000 images at 95 %. Zero disagreement on too few images
cannot prove a small budget; :func:`images_needed` says how many would.

The lower bound (:func:`drop_interval`) is the same construction with losses and gains swapped:
``D_L(b, c) = -D_U(c, b)``; screening drops a candidate early only when its lower bound on a slice
is over the budget (over it with high confidence).

What the bound does not cover: a search that tries several settings and keeps the first one whose
bound meets the budget tests several times on the same images; each verdict holds at
``confidence`` on its own, the choice among them is not corrected for (the settings of one search
are nested and their outcomes close to each other). Nor is the count of images: where a budget
grows its validation set because a setting's bound missed for lack of images, or tune sizes it from
the disagreement its first slice saw, the bound is then computed on a set that includes the images
that decided its size (a mild optional stop; a bound on fresh images only would cost the slice).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

DEFAULT_CONFIDENCE = 0.95
IMAGES_CAP = 10_000
"""the most validation images a budget asks the training split for"""
MEMORY_CAP_BYTES = 2 << 30
"""the most bytes of preprocessed validation images a budget holds at once"""
_SEARCH_LIMIT = 10**9


def check_confidence(confidence: float) -> float:
    """``confidence`` itself, or a ValueError saying what is allowed (for pydantic validators)."""
    if not (isinstance(confidence, (int, float)) and math.isfinite(confidence) and 0.5 <= confidence < 1):
        raise ValueError(f"confidence must be at least 0.5 and below 1 (e.g. 0.95), got {confidence!r}")
    return float(confidence)


def _beta_upper(k: float, n: float, tail: float) -> float:
    """Clopper-Pearson one-sided upper limit of a proportion (``k`` of ``n``, tail ``tail``)."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(1.0 - tail, k + 1, n - k))


def _beta_lower(k: float, n: float, tail: float) -> float:
    from scipy.stats import beta

    return 0.0 if k <= 0 else float(beta.ppf(tail, k, n - k + 1))


def upper_bound(n: float, lost: float, gained: float, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """One-sided upper confidence bound (top-1 points) of the drop from ``n`` paired images of which
    ``lost`` the engine got wrong where the reference was right and ``gained`` the reverse (counts
    may be real numbers: :func:`images_needed` plans with rates)."""
    if n <= 0:
        return 100.0
    tail = (1.0 - check_confidence(confidence)) / 2.0
    m = lost + gained
    q_upper = 1.0 if m <= 0 else _beta_upper(lost, m, tail)
    slope = 2.0 * q_upper - 1.0
    return 100.0 * max(_beta_upper(m, n, tail) * slope, _beta_lower(m, n, tail) * slope)


def lower_bound(n: float, lost: float, gained: float, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """One-sided lower confidence bound (points) of the drop: the upper one with losses and gains swapped."""
    return -upper_bound(n, gained, lost, confidence)


def drop_interval(n: float, lost: float, gained: float, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Two-sided interval of the drop at ``confidence``: each side one-sided at (1 + confidence) / 2."""
    one_sided = (1.0 + confidence) / 2.0
    return lower_bound(n, lost, gained, one_sided), upper_bound(n, lost, gained, one_sided)


def images_needed(budget: float, confidence: float = DEFAULT_CONFIDENCE, disagreement: float = 0.0,
                  point: float = 0.0) -> int | None:
    """The fewest images on which the bound meets ``budget`` (points) at an observed ``disagreement``
    (share of images where reference and engine differ in correctness, 0..1) and ``point`` drop
    (points); None where no count would (a point drop at or over the budget). With no disagreement:
    ``n >= ln(alpha/2) / ln(1 - budget/100)``."""
    tail = (1.0 - check_confidence(confidence)) / 2.0
    if budget >= 100:
        return 1
    if disagreement <= 0:
        return max(1, math.ceil(math.log(tail) / math.log1p(-budget / 100.0) - 1e-9))
    if point >= budget:
        return None
    point = min(point, 100.0 * disagreement)  # a rounded point drop a hair over what the disagreement allows
    rate_lost = (disagreement + point / 100.0) / 2.0
    rate_gained = disagreement - rate_lost

    def meets(n: int) -> bool:
        return upper_bound(n, n * rate_lost, n * rate_gained, confidence) <= budget + 1e-9

    high = max(1, images_needed(budget, confidence))
    while not meets(high):
        high *= 2
        if high > _SEARCH_LIMIT:
            return None
    low = high // 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if meets(mid) else (mid, high)
    return high


def images_cap(image_bytes: int) -> int:
    """The most validation images of ``image_bytes`` each a budget uses: IMAGES_CAP, or fewer where
    they would not fit in MEMORY_CAP_BYTES (ImageNet-sized float images: about 3,500)."""
    return int(max(1, min(IMAGES_CAP, MEMORY_CAP_BYTES // max(int(image_bytes), 1))))


def planned_images(budget: float, confidence: float, available: int, *, disagreement: float = 0.0,
                   point: float = 0.0, least: int = 0, cap: int = IMAGES_CAP) -> int:
    """How many validation images to use: what the bound needs at the observed ``disagreement`` and
    ``point`` drop (at least ``least``), within the ``available`` images and ``cap``."""
    needed = images_needed(budget, confidence, disagreement, max(point, 0.0))
    return int(min(available, cap, max(least, needed if needed is not None else cap)))


@dataclass
class DropBound:
    """A budget's verdict: the point drop, its upper bound and what they came from (points)."""

    point: float
    bound: float
    images: int
    lost: int
    gained: int
    confidence: float
    budget: float | None = None

    @property
    def met(self) -> bool | None:
        return None if self.budget is None else self.bound <= self.budget + 1e-9

    def needed(self) -> int | None:
        """Images the budget would need at this disagreement and point drop (None: none would)."""
        if self.budget is None:
            return None
        return images_needed(self.budget, self.confidence, (self.lost + self.gained) / max(self.images, 1),
                             max(self.point, 0.0))

    def short_of_images(self) -> bool:
        """Not met only for lack of images: more at the same disagreement and point drop would meet it."""
        needed = self.needed()
        return self.met is False and needed is not None and needed > self.images

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "budget"}
        out.update(point=round(self.point, 4), bound=round(self.bound, 4), met=self.met)
        return out

    def describe(self) -> str:
        """``drop 0.10 (bound 0.45 at 95 %, 1000 images, 12 lost, 11 gained)``"""
        return (f"drop {self.point:.2f} (bound {self.bound:.2f} at {self.confidence:.0%}, {self.images} images, "
                f"{self.lost} lost, {self.gained} gained)")


def paired(reference_correct: np.ndarray, engine_correct: np.ndarray, *, confidence: float = DEFAULT_CONFIDENCE,
           budget: float | None = None) -> DropBound:
    """The bound of the drop from per-image correctness (booleans, one per image, same order)."""
    ref = np.asarray(reference_correct, dtype=bool)
    eng = np.asarray(engine_correct, dtype=bool)
    if ref.shape != eng.shape:
        raise ValueError(f"paired outcomes differ in length: {ref.shape} and {eng.shape}")
    n = int(ref.size)
    lost, gained = int((ref & ~eng).sum()), int((~ref & eng).sum())
    point = 100.0 * (lost - gained) / n if n else 0.0
    return DropBound(point=point, bound=upper_bound(n, lost, gained, confidence), images=n, lost=lost,
                     gained=gained, confidence=confidence, budget=budget)


def from_predictions(reference: np.ndarray, engine: np.ndarray, labels: np.ndarray, **kw: Any) -> DropBound:
    """:func:`paired` from top-1 predictions (class indices) of both and the labels."""
    labels = np.asarray(labels)
    return paired(np.asarray(reference) == labels, np.asarray(engine) == labels, **kw)


def verdict_fields(bound: DropBound) -> dict[str, Any]:
    """The fields a budget's metrics block adds to its point estimate: ``drop_bound``, ``confidence``,
    ``lost``, ``gained`` and, where the budget failed only for lack of images, ``images_needed``."""
    out: dict[str, Any] = {"drop_bound": round(bound.bound, 4), "confidence": bound.confidence,
                           "lost": bound.lost, "gained": bound.gained}
    if bound.short_of_images():
        out["images_needed"] = bound.needed()
    return out


def too_few_line(what: str, budget: float, confidence: float, images: int) -> str | None:
    """One line where ``images`` cannot prove ``budget`` even with no disagreement, else None."""
    needed = images_needed(budget, confidence)
    if needed is None or needed <= images:
        return None
    return (f"{what}: {images} validation images cannot prove a drop within {budget} points at "
            f"{confidence:.0%} confidence even with no disagreement; {needed} would")


def fixed_count_problem(budget: float | None, images: int | None, confidence: float, *,
                        count: str = "validation_samples", limit: str = "max_drop") -> str | None:
    """Why a fixed count of validation ``images`` can never prove ``budget`` (points), or None: for a
    config validator, where the count is known before any image is read. ``count`` and ``limit``:
    what the user calls the two."""
    if budget is None or images is None:
        return None
    needed = images_needed(budget, confidence)
    if needed is None or needed <= images:
        return None
    return (f"{count} {images} cannot prove {limit} {budget} at confidence {confidence} even with no "
            f"disagreement: {needed} images would (or leave {count} out to let the bound choose)")
