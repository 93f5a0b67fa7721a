"""DPM-Solver++ multistep sampler for flow matching (Wan's "dpm++").

Role: ``DPMSolverPPSampler`` (registry name ``dpm++``) reproduces, step by step,
diffusers' ``DPMSolverMultistepScheduler(prediction_type="flow_prediction",
use_flow_sigmas=True, flow_shift=shift, algorithm_type="dpmsolver++",
solver_type="midpoint", solver_order=2, lower_order_final=True,
final_sigmas_type="zero")`` driven by ``set_timesteps(num_steps)``.

Schedule: ``sigma_i = shift(u_i)`` for ``u = 1 - linspace(1, 1/T, N + 1)``, reversed,
without its 0 (so ``u_0 = 1 - 1/T``), then ``sigma_N = 0``. The DiT gets
``trunc(sigma_i * T)``. (Wan's official UniPC uses this grid too, up to rounding;
Wan's official "dpm++" uses the Euler sampler's grid, ``shift(linspace(1, 0, N + 1)[:N])``.)

Math (DPM-Solver++, Lu et al. 2022, multistep, data prediction). With
``m_i = x - sigma_i * v``, ``lambda = log(alpha / sigma)``, ``h = lambda_{i+1} - lambda_i``,
``phi = alpha_{i+1} * (exp(-h) - 1)`` and ``r0 = h_{i-1} / h`` (the previous step's
``h`` over this one):

    order 1 (DDIM):  x_{i+1} = (sigma_{i+1} / sigma_i) * x_i - phi * m_i
    order 2:         ... - phi * D0 - 1/2 * phi * D1,
                     D0 = m_i, D1 = (m_i - m_{i-1}) / r0        ("midpoint")
    order 3:         ... - phi * D0 + alpha (phi_/h + 1) * D1 - alpha ((phi_ + h)/h^2 - 1/2) * D2
                     with phi_ = exp(-h) - 1 and D1, D2 the first and second divided
                     differences of the last three predictions (r1 = h_{i-2} / h).

Order at step ``i``: 1 at the first step and at the last one (the move to sigma 0,
which yields ``m_{N-1}``); 2 at the second step, and at the one before last when
``N < 15``; else ``solver_order``.

Talks to: ``base`` (grid helpers, ``FlowSampler``), ``config``.
"""

from __future__ import annotations

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

# Below this many steps the second-to-last step also drops to second order.
_FEW_STEPS = 15


class DPMSolverPPSampler(FlowSampler):
    """DPM-Solver++ (multistep, midpoint, orders 1-3) on the flow-matching grid."""

    name = "dpm++"

    @classmethod
    def _schedule(cls, config: SamplerConfig) -> tuple[torch.Tensor, torch.Tensor]:
        horizon = config.num_train_timesteps
        uniform = 1.0 - np.linspace(1, 1 / horizon, config.num_steps + 1)
        sigmas = np.flip(shift_sigmas(uniform, config.shift))[:-1].copy()
        return with_final_zero(sigmas), truncated_timesteps(sigmas, horizon)

    def _clear_history(self) -> None:
        self._predictions: list[torch.Tensor] = []  # data predictions, newest last

    def order_at(self, index: int) -> int:
        """The solver order used at step ``index``."""
        last = self.num_steps - 1
        if self._config.solver_order == 1 or index == 0 or index == last:
            return 1
        if (
            self._config.solver_order == 2
            or index == 1
            or (index == last - 1 and self.num_steps < _FEW_STEPS)
        ):
            return 2
        return 3

    def _advance(self, velocity: torch.Tensor, sample: torch.Tensor, index: int) -> torch.Tensor:
        prediction = sample - self.sigma(index) * velocity
        self._predictions.append(prediction)
        del self._predictions[: -self._config.solver_order]
        if self.sigma(index + 1) == 0.0:
            # First order into sigma = 0: (0 / sigma) * x - (1 * (0 - 1)) * m = m exactly.
            return prediction

        sigmas = self._sigmas
        sigma_t, sigma_s = sigmas[index + 1], sigmas[index]
        alpha_t = 1 - sigma_t
        lambda_t, lambda_s = half_log_snr(sigma_t), half_log_snr(sigma_s)
        h = lambda_t - lambda_s
        decay = torch.exp(-h) - 1.0
        phi = alpha_t * decay
        x_t = (sigma_t / sigma_s).item() * sample - phi.item() * prediction

        order = self.order_at(index)
        if order == 1:
            return x_t
        lambda_s1 = half_log_snr(sigmas[index - 1])
        r0 = (lambda_s - lambda_s1) / h
        m0, m1 = self._predictions[-1], self._predictions[-2]
        if order == 2:
            d1 = (1.0 / r0).item() * (m0 - m1)
            return x_t - (0.5 * phi).item() * d1

        lambda_s2 = half_log_snr(sigmas[index - 2])
        r1 = (lambda_s1 - lambda_s2) / h
        m2 = self._predictions[-3]
        d1_0 = (1.0 / r0).item() * (m0 - m1)
        d1_1 = (1.0 / r1).item() * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)).item() * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)).item() * (d1_0 - d1_1)
        c1 = alpha_t * (decay / h + 1.0)
        c2 = alpha_t * ((decay + h) / h**2 - 0.5)
        return x_t + c1.item() * d1 - c2.item() * d2
