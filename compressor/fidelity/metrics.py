"""How far an output is from its reference: one definition of each figure.

* :func:`sqnr_db` / :func:`sqnr_from_sums`: signal-to-quantization-noise ratio, 10 log10(sum(ref^2) /
  sum((ref - out)^2)), None where the two are identical (infinite);
* :func:`channel_sqnr_db`: each channel's noise against its own power, averaged;
* :func:`cosine`: cosine similarity from the sums;
* :func:`nmse`: normalized mean squared error, sum((ref - out)^2) / sum(ref^2) (the budget's ranking).
"""

from __future__ import annotations

import numpy as np

ZERO_SIGNAL_DB = 99.0
"""the SQNR explain reports for a layer whose reference is all zeros but whose output is not"""


def sqnr_from_sums(signal: float, noise: float, *, zero_signal_db: float | None = None) -> float | None:
    """:func:`sqnr_db` from its sums (accumulated batch by batch). ``zero_signal_db``: the figure for
    a zero signal with noise (None: what the formula gives, -inf)."""
    if noise == 0.0:
        return None
    if signal == 0 and zero_signal_db is not None:
        return zero_signal_db
    return 10.0 * float(np.log10(signal / noise))


def sqnr_db(reference: np.ndarray, output: np.ndarray) -> float | None:
    """Signal-to-quantization-noise ratio of ``output`` against ``reference`` in dB:
    10 log10(sum(ref^2) / sum((ref - out)^2)); None where the two are identical (infinite)."""
    ref = reference.astype(np.float64)
    noise = float(((ref - output.astype(np.float64)) ** 2).sum())
    return sqnr_from_sums(float((ref ** 2).sum()), noise)


def channel_sqnr_db(channel_signal: np.ndarray, channel_noise: np.ndarray) -> float | None:
    """A channel's noise against its own power, floored at 1% of the typical (median) channel's, so
    dead channels do not dominate and an outlier channel does not set the scale of the rest;
    -10 log10 of the mean ratio. None where there is no noise."""
    if channel_noise.sum() <= 0:
        return None
    live = channel_signal[channel_signal > 0]
    floor = 1e-2 * float(np.median(live)) if live.size else 1e-30
    ratio = channel_noise / np.maximum(channel_signal, floor)
    return float(-10 * np.log10(ratio.mean())) if ratio.mean() > 0 else None


def cosine(dot: float, signal: float, output_power: float) -> float | None:
    """Cosine similarity from sum(ref * out), sum(ref^2) and sum(out^2); None where either is zero."""
    return dot / np.sqrt(signal * output_power) if signal > 0 and output_power > 0 else None


def nmse(reference: np.ndarray, output: np.ndarray) -> float:
    """sum((ref - out)^2) / sum(ref^2), the reference in float64."""
    ref = reference.astype(np.float64)
    return float(((ref - output) ** 2).sum() / max(float((ref ** 2).sum()), 1e-30))
