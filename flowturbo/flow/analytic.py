"""Flows whose velocity is known in closed form, for testing solvers.

For data x1 from an isotropic Gaussian mixture sum_k w_k N(mu_k, s_k^2 I) and noise x0 ~ N(0, I),
the linear path x_t = t x1 + (1 - t) x0 has, given component k, x_t ~ N(t mu_k, sigma_k(t)^2 I)
with sigma_k(t)^2 = t^2 s_k^2 + (1 - t)^2, and

    E[x1 - x0 | x_t = x, k] = mu_k + (t s_k^2 - (1 - t)) / sigma_k(t)^2 (x - t mu_k).

The marginal velocity is the posterior-weighted sum over k. For one component the ODE solution
is exact: x(t) = t mu + sigma(t) x0.
"""

from __future__ import annotations

import torch
from torch import Tensor


class GaussianMixtureFlow:
    """Exact velocity of the linear path from N(0, I) to an isotropic Gaussian mixture.

    Args:
        means: (K, C, H, W) component means.
        stds: (K,) component standard deviations s_k > 0.
        weights: (K,) mixture weights (normalised here); default uniform.
    """

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor | None = None):
        self.means = means.double()
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        k = self.means.shape[0]
        w = torch.ones(k, dtype=torch.float64) if weights is None else weights.double()
        self.log_weights = (w / w.sum()).log()
        if self.stds.shape != (k,) or bool((self.stds <= 0).any()):
            raise ValueError("stds must be K positive numbers, one per mean")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    def __call__(self, x: Tensor, t: Tensor, **_: object) -> Tensor:
        """Velocity v(x, t). x (B, C, H, W), t (B,) -> (B, C, H, W), computed in float64."""
        b, d = x.shape[0], x[0].numel()
        xf = x.double().reshape(b, 1, d)  # (B, 1, D)
        tt = t.double().reshape(b, 1, 1)  # (B, 1, 1)
        mu = self.means.reshape(1, -1, d).to(x.device)  # (1, K, D)
        s2 = self.stds.to(x.device).pow(2).reshape(1, -1, 1)  # (1, K, 1)
        var = tt**2 * s2 + (1 - tt) ** 2  # (B, K, 1)
        resid = xf - tt * mu  # (B, K, D)
        logp = (
            self.log_weights.to(x.device)
            - 0.5 * (resid.pow(2).sum(-1) / var[..., 0])
            - 0.5 * d * var[..., 0].log()
        )  # (B, K)
        post = torch.softmax(logp, dim=1).unsqueeze(-1)  # (B, K, 1)
        v_k = mu + (tt * s2 - (1 - tt)) / var * resid  # (B, K, D)
        return (post * v_k).sum(1).reshape(x.shape).to(x.dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws from the mixture. -> (n, C, H, W) float64."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        eps = torch.randn((n, *self.shape), dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k].reshape(-1, *[1] * len(self.shape)) * eps

    def exact_solution(self, noise: Tensor, t: float = 1.0) -> Tensor:
        """x(t) from x(0) = noise, exact for a single component. (B, C, H, W) -> same."""
        if self.means.shape[0] != 1:
            raise ValueError("the closed-form solution exists for one component only")
        s2 = float(self.stds[0]) ** 2
        sigma = (t * t * s2 + (1 - t) ** 2) ** 0.5
        return t * self.means[0].to(noise.device) + sigma * noise.double()


class ExactRefiner:
    """The ideal refiner of a known velocity field: R(x, t, v) = V(x, t) - v."""

    def __init__(self, velocity):
        self.velocity = velocity

    def __call__(self, x: Tensor, t: Tensor, v: Tensor, **kw: object) -> Tensor:
        return self.velocity(x, t, **kw) - v
