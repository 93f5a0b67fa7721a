"""UniPC multistep sampler for flow matching: Wan2.1's default solver.

Role: ``UniPCSampler`` (registry name ``unipc``) reproduces, step by step, diffusers'
``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
flow_shift=shift, solver_order=2, predict_x0=True, solver_type="bh2",
lower_order_final=True, final_sigmas_type="zero")`` -- the scheduler shipped with the
Wan2.1 diffusers checkpoints -- driven by ``set_timesteps(num_steps)``.

Schedule: ``sigma_i = shift(u_i)`` for ``u = linspace(1, 1/T, N + 1)[:N]``, the first
one pulled to ``1 - 1e-6`` so that ``lambda`` stays finite, then ``sigma_N = 0``.
The DiT gets ``trunc(sigma_i * T)``. (Wan's official ``FlowUniPCMultistepScheduler``
starts its uniform grid at ``1 - 1/T`` instead, like the ``dpm++`` sampler here; we follow
diffusers, the project's reference.)

Math (UniPC, Zhao et al. 2023, data-prediction form). With ``m_i = x - sigma_i * v``
the data prediction at step ``i``, ``h = lambda_t - lambda_s`` for a move from
``sigma_s`` to ``sigma_t``, ``hh = -h`` and ``B(h) = expm1(hh)`` (the "bh2" variant):

    x_t = (sigma_t / sigma_s) * x_s - alpha_t * expm1(hh) * m_s
          - alpha_t * B(h) * sum_k rho_k * D_k,     D_k = (m_k - m_s) / r_k,

where ``r_k = (lambda_k - lambda_s) / h`` places an earlier prediction ``m_k`` and the
weights solve the order conditions ``sum_k rho_k * r_k**(i - 1) = g_i`` with
``g_i = i! * hh * phi_{i+1}(hh) / B(h)`` (``phi_1(z) = expm1(z) / z``,
``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``).

- Predictor UniP-p moves ``x_i`` to ``sigma_{i+1}`` using ``m_i`` and the ``p - 1``
  previous predictions (first ``p - 1`` conditions; ``rho = 1/2`` when p = 2).
- Corrector UniC-p, at the start of step ``i > 0``, redoes the previous move
  ``sigma_{i-1} -> sigma_i`` from the previous starting sample, now also using the
  fresh ``m_i`` (with ``r = 1``): all ``p`` conditions, ``rho = 1/2`` when p = 1.
  The corrected sample replaces ``x_i``; no extra model evaluation.
- Order: ``p_i = min(solver_order, N - i, i + 1)`` (warm-up, then lower order at the
  end); the last move to ``sigma_N = 0`` is first order and yields ``m_{N-1}``.

Talks to: ``base`` (grid helpers, ``FlowSampler``), ``config``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from smartdiff.samplers.base import (
    FlowSampler,
    half_log_snr,
    shift_sigmas,
    truncated_timesteps,
    with_final_zero,
)
from smartdiff.samplers.config import SamplerConfig

# diffusers keeps the first sigma below 1 so that log(alpha) = log(1 - sigma) is finite.
_FIRST_SIGMA_MARGIN = 1e-6


@dataclass(frozen=True)
class _UniUpdate:
    """One UniP or UniC move ``sigma_s -> sigma_t``, its scalars as float32 values.

    ``history`` pairs each earlier prediction's weight with its ``r_k``; ``rho_new``
    is the corrector's weight for the fresh prediction (None for the predictor).
    """

    sample_scale: float  # sigma_t / sigma_s
    data_scale: float  # alpha_t * expm1(hh)
    residual_scale: float  # alpha_t * B(h)
    history: tuple[tuple[float, float], ...]
    rho_new: float | None

    def apply(
        self,
        x_s: torch.Tensor,
        m_s: torch.Tensor,
        earlier: Sequence[torch.Tensor],
        m_new: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x_t = self.sample_scale * x_s - self.data_scale * m_s
        residual: torch.Tensor | None = None
        for (rho, r), m_k in zip(self.history, earlier, strict=True):
            term = rho * ((m_k - m_s) / r)
            residual = term if residual is None else residual + term
        if self.rho_new is not None:
            if m_new is None:
                raise ValueError("m_new=None is not allowed: the corrector needs it")
            term = self.rho_new * (m_new - m_s)
            residual = term if residual is None else residual + term
        if residual is None:
            return x_t
        return x_t - self.residual_scale * residual


def _order_conditions(hh: torch.Tensor, b_h: torch.Tensor, count: int) -> torch.Tensor:
    """``g_i = i! * hh * phi_{i+1}(hh) / B(h)`` for ``i = 1..count`` (float32)."""
    values = []
    hh_phi = torch.expm1(hh) / hh - 1  # hh * phi_2(hh)
    factorial = 1
    for i in range(1, count + 1):
        values.append(hh_phi * factorial / b_h)
        factorial *= i + 1
        hh_phi = hh_phi / hh - 1 / factorial  # hh * phi_{i+2}(hh)
    return torch.stack(values)


def _uni_update(
    sigmas: torch.Tensor, target: int, start: int, earlier: Sequence[int], corrector: bool
) -> _UniUpdate:
    """The UniP (``corrector=False``) or UniC move from ``sigmas[start]`` to ``sigmas[target]``.

    ``earlier`` lists the sigma indices of the older predictions, newest first.
    """
    sigma_t, sigma_s = sigmas[target], sigmas[start]
    alpha_t = 1 - sigma_t
    lambda_s = half_log_snr(sigma_s)
    h = half_log_snr(sigma_t) - lambda_s
    hh = -h
    b_h = torch.expm1(hh)  # B(h) of "bh2", which is also the data term's hh * phi_1(hh)
    ratios = [(half_log_snr(sigmas[k]) - lambda_s) / h for k in earlier]

    order = len(earlier) + 1
    if corrector:
        nodes = torch.stack([*ratios, torch.ones(())])
        if order == 1:
            rhos = [0.5]
        else:
            vandermonde = torch.stack([torch.pow(nodes, i) for i in range(order)])
            rhos = torch.linalg.solve(vandermonde, _order_conditions(hh, b_h, order)).tolist()
        history_rhos, rho_new = rhos[:-1], rhos[-1]
    else:
        rho_new = None
        if order == 1:
            history_rhos = []
        elif order == 2:
            history_rhos = [0.5]
        else:
            nodes = torch.stack(ratios)
            vandermonde = torch.stack([torch.pow(nodes, i) for i in range(order - 1)])
            conditions = _order_conditions(hh, b_h, order)[:-1]
            history_rhos = torch.linalg.solve(vandermonde, conditions).tolist()

    return _UniUpdate(
        sample_scale=(sigma_t / sigma_s).item(),
        data_scale=(alpha_t * b_h).item(),
        residual_scale=(alpha_t * b_h).item(),
        history=tuple(zip(history_rhos, (r.item() for r in ratios), strict=True)),
        rho_new=rho_new,
    )


class UniPCSampler(FlowSampler):
    """UniPC (predictor UniP-p + corrector UniC-p, "bh2") on the flow-matching grid."""

    name = "unipc"

    @classmethod
    def _schedule(cls, config: SamplerConfig) -> tuple[torch.Tensor, torch.Tensor]:
        horizon = config.num_train_timesteps
        uniform = np.linspace(1, 1 / horizon, config.num_steps + 1)[:-1]
        sigmas = shift_sigmas(uniform, config.shift)
        if abs(sigmas[0] - 1) < _FIRST_SIGMA_MARGIN:
            sigmas[0] -= _FIRST_SIGMA_MARGIN
        return with_final_zero(sigmas), truncated_timesteps(sigmas, horizon)

    def _clear_history(self) -> None:
        self._predictions: list[torch.Tensor] = []  # data predictions, newest last
        self._last_start: torch.Tensor | None = None  # sample the last predictor left from
        self._last_order = 0

    def order_at(self, index: int) -> int:
        """The predictor order used at step ``index``."""
        return min(self._config.solver_order, self.num_steps - index, index + 1)

    def _advance(self, velocity: torch.Tensor, sample: torch.Tensor, index: int) -> torch.Tensor:
        prediction = sample - self.sigma(index) * velocity
        if index == 0:
            sample = sample.clone()  # kept as the corrector's start: not the caller's tensor
        else:
            if self._last_start is None:
                raise AssertionError("UniPC history lost between steps")
            earlier = range(index - 2, index - 1 - self._last_order, -1)
            corrector = _uni_update(self._sigmas, index, index - 1, earlier, corrector=True)
            sample = corrector.apply(
                self._last_start,
                self._predictions[-1],
                self._earlier_predictions(len(earlier)),
                m_new=prediction,
            )

        self._predictions.append(prediction)
        del self._predictions[: -self._config.solver_order]
        order = self.order_at(index)
        self._last_start = sample
        self._last_order = order

        if self.sigma(index + 1) == 0.0:
            # The move to sigma = 0 is first order: (0 / sigma) * x + 1 * m = m exactly.
            return prediction
        earlier = range(index - 1, index - order, -1)
        predictor = _uni_update(self._sigmas, index + 1, index, earlier, corrector=False)
        return predictor.apply(sample, prediction, self._earlier_predictions(len(earlier)))

    def _earlier_predictions(self, count: int) -> list[torch.Tensor]:
        """The ``count`` predictions before the newest one, newest first."""
        return [self._predictions[-2 - k] for k in range(count)]
