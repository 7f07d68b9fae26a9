"""The noise schedule as a pure value object (METHOD.md section 1).

The base chain has ``num_base_levels`` = 1001 levels t = 0 ... 1000 with beta
linear from ``beta_start`` to ``beta_end``. A :class:`Schedule` is a *resampled*
chain of K kept levels t_1 < ... < t_K. It keeps alpha_bar exactly at the kept
levels and derives every other quantity from alpha_bar, so a chain with K = 1001
is the base chain itself.

Indexing convention: ``k`` is 1-based (1 = least noisy ... K = most noisy), as in
the paper; arrays are stored 0-based, so array[k - 1] belongs to level k.
The previous level of k is k - 1 in the *resampled* chain, i.e. base level
t_{k-1}, never base level t_k - 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

NUM_BASE_LEVELS = 1001
BETA_START = 1e-4
BETA_END = 0.02


def base_alpha_bar(num_base_levels: int = NUM_BASE_LEVELS, beta_start: float = BETA_START,
                   beta_end: float = BETA_END) -> np.ndarray:
    """alpha_bar of the linear base chain, float64, shape ``(num_base_levels,)``."""
    if num_base_levels < 2:
        raise ValueError(f"num_base_levels must be >= 2, got {num_base_levels}")
    betas = np.linspace(beta_start, beta_end, num_base_levels, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def kept_levels(num_steps: int, num_base_levels: int = NUM_BASE_LEVELS) -> np.ndarray:
    """Base levels kept by resampling to ``num_steps`` levels (paper section 3.1).

    Evenly spaced, both ends included (t_1 = 0, t_K = T), rounded to integers.
    K = 1 keeps only the noisy end T: the chain then is a single prediction of x0
    from pure noise.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"number of steps must be an integer, got {num_steps!r}")
    if not 1 <= num_steps <= num_base_levels:
        raise ValueError(f"number of steps must be in [1, {num_base_levels}], got {num_steps}")
    last = num_base_levels - 1
    if num_steps == 1:
        return np.array([last], dtype=np.int64)
    levels = np.round(np.linspace(0, last, num_steps)).astype(np.int64)
    assert np.all(np.diff(levels) > 0), levels
    return levels


@dataclass(frozen=True, eq=False)
class Schedule:
    """A K-level resampled chain; every array has shape ``(K,)`` and dtype float64.

    Attributes (index k - 1 holds level k):
        timesteps: base level t_k of each kept level (int64).
        alpha_bar: alpha_bar at t_k.
        alpha_bar_prev: alpha_bar at t_{k-1}, with alpha_bar_prev[0] = 1.
        beta: beta_k = 1 - alpha_bar_k / alpha_bar_prev_k.
        posterior_variance: beta_tilde_k = beta_k (1 - alpha_bar_prev_k) / (1 - alpha_bar_k).
        posterior_coef_x0: c0_k = beta_k sqrt(alpha_bar_prev_k) / (1 - alpha_bar_k).
        posterior_coef_xt: ct_k = sqrt(1 - beta_k) (1 - alpha_bar_prev_k) / (1 - alpha_bar_k).
    """

    timesteps: np.ndarray
    alpha_bar: np.ndarray
    alpha_bar_prev: np.ndarray = field(init=False)
    beta: np.ndarray = field(init=False)
    posterior_variance: np.ndarray = field(init=False)
    posterior_coef_x0: np.ndarray = field(init=False)
    posterior_coef_xt: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        timesteps = np.asarray(self.timesteps, dtype=np.int64)
        alpha_bar = np.asarray(self.alpha_bar, dtype=np.float64)
        if timesteps.shape != alpha_bar.shape or timesteps.ndim != 1 or len(timesteps) == 0:
            raise ValueError("timesteps and alpha_bar must be non-empty 1D arrays of equal length")
        alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
        beta = 1.0 - alpha_bar / alpha_bar_prev
        one_minus = 1.0 - alpha_bar
        values = {
            "timesteps": timesteps,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "beta": beta,
            "posterior_variance": beta * (1.0 - alpha_bar_prev) / one_minus,
            "posterior_coef_x0": beta * np.sqrt(alpha_bar_prev) / one_minus,
            "posterior_coef_xt": np.sqrt(1.0 - beta) * (1.0 - alpha_bar_prev) / one_minus,
        }
        for name, value in values.items():
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_torch_cache", {})

    # ------------------------------------------------------------------ construction
    @classmethod
    def resampled(cls, num_steps: int, num_base_levels: int = NUM_BASE_LEVELS,
                  beta_start: float = BETA_START, beta_end: float = BETA_END) -> "Schedule":
        """The chain of ``num_steps`` evenly spaced levels of the linear base chain."""
        levels = kept_levels(num_steps, num_base_levels)
        return cls(levels, base_alpha_bar(num_base_levels, beta_start, beta_end)[levels])

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def rows(self) -> list[Dict[str, float]]:
        """One dict per level k = 1 ... K (used by the CLI's table and JSON output)."""
        return [
            {
                "k": k + 1,
                "t": int(self.timesteps[k]),
                "alpha_bar": float(self.alpha_bar[k]),
                "beta": float(self.beta[k]),
                "posterior_variance": float(self.posterior_variance[k]),
                "posterior_coef_x0": float(self.posterior_coef_x0[k]),
                "posterior_coef_xt": float(self.posterior_coef_xt[k]),
            }
            for k in range(self.num_steps)
        ]

    # ------------------------------------------------------------------ tensor helpers
    def _check_k(self, k: int) -> int:
        if not 1 <= k <= self.num_steps:
            raise ValueError(f"level k must be in [1, {self.num_steps}], got {k}")
        return k - 1

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """float32 copy of one array on ``device``, built once per device."""
        key = (name, str(device))
        cache: Dict[Tuple[str, str], torch.Tensor] = self._torch_cache  # type: ignore[attr-defined]
        if key not in cache:
            dtype = torch.int64 if name == "timesteps" else torch.float32
            cache[key] = torch.tensor(np.array(getattr(self, name)), dtype=dtype, device=device)
        return cache[key]

    def extract(self, name: str, k: torch.Tensor, ndim: int) -> torch.Tensor:
        """Array ``name`` at 1-based levels ``k`` (shape ``(B,)``), shaped ``(B, 1, ...)`` for broadcasting
        against a tensor with ``ndim`` dimensions."""
        values = self._table(name, k.device)[k.long() - 1]
        return values.reshape(values.shape + (1,) * (ndim - values.ndim))

    def timesteps_of(self, k: torch.Tensor) -> torch.Tensor:
        """Base levels t_k for 1-based levels ``k`` (shape ``(B,)``, int64)."""
        return self._table("timesteps", k.device)[k.long() - 1]

    def q_sample(self, x0: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process: x_k = sqrt(alpha_bar_k) x0 + sqrt(1 - alpha_bar_k) noise.

        x0, noise: ``(B, C, *spatial)``; k: ``(B,)`` 1-based levels.
        """
        alpha_bar = self.extract("alpha_bar", k, x0.ndim)
        return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, xt: torch.Tensor, k: int) -> Tuple[torch.Tensor, float]:
        """Mean and variance of q(x_{k-1} | x_k, x0) for one level k shared by the whole batch."""
        i = self._check_k(k)
        mean = float(self.posterior_coef_x0[i]) * x0 + float(self.posterior_coef_xt[i]) * xt
        return mean, float(self.posterior_variance[i])


def format_table(rows: Sequence[Dict[str, float]]) -> str:
    """A fixed-width text table of :meth:`Schedule.rows`."""
    header = f"{'k':>5} {'t':>5} {'alpha_bar':>13} {'beta':>13} {'beta_tilde':>13} {'c0':>13} {'ct':>13}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['k']:>5d} {r['t']:>5d} {r['alpha_bar']:>13.6g} {r['beta']:>13.6g} "
            f"{r['posterior_variance']:>13.6g} {r['posterior_coef_x0']:>13.6g} {r['posterior_coef_xt']:>13.6g}"
        )
    return "\n".join(lines)
