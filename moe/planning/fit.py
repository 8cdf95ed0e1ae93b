"""Scaling-law fits for a ladder of runs (moe/planning/ladder.py trains the rungs and applies these).

- `fit_power_law(x, loss)`: L(x) = E + A / x^alpha, x the parameters N (Kaplan et al. 2020's L(N), with an
  irreducible term as Hoffmann et al. 2022 fit it) or the training compute C. Least squares by scipy's
  `curve_fit` with A on a log scale (the rungs' A / x^alpha spans decades); the exponent's standard error and a
  prediction interval come from the fit's covariance (delta method), widened by the residual spread, with Student's
  t quantile for the rungs' n - 3 degrees of freedom (a ladder has few rungs: 1.96 would claim too much).
- `fit_chinchilla(n, d, loss)`: L(N, D) = E + A / N^alpha + B / D^beta, for ladders whose rungs vary the tokens too.
- `compute_multiplier(dense, moe_compute, moe_loss)`: the dense compute that reaches the MoE run's loss on the
  dense family's L(C) curve, over the MoE run's compute (Clark et al. 2022's "effective compute"; Krajewski et al.
  2024 report MoE gains the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import curve_fit
from scipy.stats import t as student_t


def _power_law(log_x, e, log_a, alpha):
    return e + np.exp(log_a - alpha * log_x)


@dataclass
class PowerLawFit:
    """L(x) = E + A / x^alpha fitted to the rungs; `covariance` is of (E, log A, alpha)."""

    e: float
    a: float
    alpha: float
    covariance: np.ndarray
    residual_std: float  # of the rungs' losses about the fit (nats)
    dof: int = 1  # rungs minus the 3 parameters

    @property
    def alpha_stderr(self) -> float:
        return math.sqrt(self.covariance[2, 2])

    @property
    def e_stderr(self) -> float:
        return math.sqrt(self.covariance[0, 0])

    def loss(self, x: float) -> float:
        return float(_power_law(math.log(x), self.e, math.log(self.a), self.alpha))

    def interval(self, x: float, level: float = 0.95) -> tuple[float, float]:
        """A `level` prediction interval of the loss at x: the fit's uncertainty (delta method on the parameters'
        covariance) and the rungs' scatter about it, added in quadrature, times Student's t quantile for `dof`."""
        log_x = math.log(x)
        term = self.a * x ** -self.alpha
        gradient = np.array([1.0, term, -term * log_x])  # dL/dE, dL/dlogA, dL/dalpha
        sigma = math.sqrt(float(gradient @ self.covariance @ gradient) + self.residual_std ** 2)
        center = self.loss(x)
        z = float(student_t.ppf(0.5 + level / 2, self.dof))
        return center - z * sigma, center + z * sigma

    def inverse(self, loss: float) -> float:
        """The x at which the curve reaches `loss` (inf at or below E)."""
        if loss <= self.e:
            return math.inf
        return (self.a / (loss - self.e)) ** (1 / self.alpha)

    def as_dict(self) -> dict:
        return {"E": self.e, "A": self.a, "alpha": self.alpha, "alpha_stderr": self.alpha_stderr,
                "E_stderr": self.e_stderr, "residual_std": self.residual_std, "dof": self.dof}


def fit_power_law(x, loss) -> PowerLawFit:
    """Fit L(x) = E + A / x^alpha to at least four rungs (three parameters and one degree of freedom for the
    uncertainty). Raises ValueError naming what is wrong with the rungs."""
    x, loss = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    if x.shape != loss.shape or x.ndim != 1:
        raise ValueError(f"need one loss per rung, got {x.shape} sizes and {loss.shape} losses")
    if len(x) < 4:
        raise ValueError(f"a power law with an irreducible term has 3 parameters: fit it to at least 4 rungs, got {len(x)}")
    if np.any(x <= 0) or not np.all(np.isfinite(loss)):
        raise ValueError("rung sizes must be positive and losses finite")
    if len(np.unique(x)) < 4:
        raise ValueError("the rungs need at least 4 different sizes")
    log_x = np.log(x)
    # Start E below the smallest loss and alpha at Kaplan's order of magnitude; A then matches the largest loss.
    e0 = 0.9 * loss.min()
    alpha0 = 0.3
    log_a0 = math.log(max(loss.max() - e0, 1e-6)) + alpha0 * log_x[np.argmax(loss)]
    params, covariance = curve_fit(_power_law, log_x, loss, p0=[e0, log_a0, alpha0],
                                   bounds=([0.0, -np.inf, 1e-4], [loss.min(), np.inf, 5.0]), maxfev=20000)
    residuals = loss - _power_law(log_x, *params)
    dof = len(x) - 3  # at least 1: four rungs are required
    residual_std = float(np.sqrt(np.sum(residuals ** 2) / dof))
    return PowerLawFit(float(params[0]), float(math.exp(params[1])), float(params[2]), covariance, residual_std,
                       dof=dof)


@dataclass
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta; `stderr` of (E, A, alpha, B, beta)."""

    e: float
    a: float
    alpha: float
    b: float
    beta: float
    stderr: tuple[float, ...]

    def loss(self, n: float, d: float) -> float:
        return self.e + self.a / n ** self.alpha + self.b / d ** self.beta

    def as_dict(self) -> dict:
        names = ["E", "A", "alpha", "B", "beta"]
        return {**dict(zip(names, (self.e, self.a, self.alpha, self.b, self.beta))),
                **{f"{name}_stderr": s for name, s in zip(names, self.stderr)}}


def _chinchilla(log_nd, e, log_a, alpha, log_b, beta):
    log_n, log_d = log_nd
    return e + np.exp(log_a - alpha * log_n) + np.exp(log_b - beta * log_d)


def fit_chinchilla(n, d, loss) -> ChinchillaFit:
    """Fit L(N, D) to rungs that vary both N and D (at least 6, spanning at least 2 values of each)."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    if not n.shape == d.shape == loss.shape or n.ndim != 1:
        raise ValueError("need one (N, D, loss) triple per rung")
    if len(n) < 6 or len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise ValueError("L(N, D) has 5 parameters: fit it to at least 6 rungs varying both N and D")
    log_nd = np.log(np.stack([n, d]))
    p0 = [0.8 * loss.min(), math.log(400.0), 0.3, math.log(400.0), 0.3]
    params, covariance = curve_fit(_chinchilla, log_nd, loss, p0=p0,
                                   bounds=([0.0, -np.inf, 1e-4, -np.inf, 1e-4], [loss.min(), np.inf, 5, np.inf, 5]),
                                   maxfev=50000)
    e, log_a, alpha, log_b, beta = (float(p) for p in params)
    a, b = math.exp(log_a), math.exp(log_b)
    se = np.sqrt(np.diag(covariance))
    # Standard errors of A and B from those of their logs (delta method).
    stderr = (float(se[0]), a * float(se[1]), float(se[2]), b * float(se[3]), float(se[4]))
    return ChinchillaFit(e, a, alpha, b, beta, stderr)


def compute_multiplier(dense_vs_compute: PowerLawFit, moe_compute: float, moe_loss: float) -> float:
    """How many times the MoE run's training compute a dense model of the fitted family needs to reach the same
    loss: C_dense(L_moe) / C_moe, from the dense family's L(C). Inf when the MoE loss is below the dense
    family's irreducible term (outside what the fit can say)."""
    return dense_vs_compute.inverse(moe_loss) / moe_compute
