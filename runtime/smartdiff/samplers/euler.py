"""Euler sampler for flow matching: the plain first-order ODE step.

Role: ``EulerSampler`` (registry name ``euler``) integrates ``dx/dsigma = v`` with one
Euler step per model evaluation:

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i

Schedule: Wan's official shifted grid, ``sigma_i = shift(1 - i / N)`` for
``i = 0..N-1`` (``shift(t) = s * t / (1 + (s - 1) * t)``), then ``sigma_N = 0``; the DiT
gets the float timestep ``sigma_i * T``. This equals diffusers'
``FlowMatchEulerDiscreteScheduler(shift=shift)`` driven by
``set_timesteps(sigmas=np.linspace(1, 0, N + 1)[:N])``. Note that
``set_timesteps(num_steps)`` alone does not: that grid runs from 1 to
``shift(1/T)`` before the shift is applied, so its last sigma is shifted twice.

Numerics as diffusers: the grid in float32, the step in float32. Unlike diffusers,
which returns the result in the model output's dtype and multiplies ``dt`` into a
low-precision model output before upcasting, the velocity is upcast first and the
result comes back in the sample's dtype (identical for float32 inputs).

Talks to: ``base`` (grid helpers, ``FlowSampler``), ``config``.
"""

from __future__ import annotations

import numpy as np
import torch

from smartdiff.samplers.base import FlowSampler, shift_sigmas, with_final_zero
from smartdiff.samplers.config import SamplerConfig


class EulerSampler(FlowSampler):
    """First-order Euler steps on Wan's shifted flow-matching grid (no history)."""

    name = "euler"

    @classmethod
    def _schedule(cls, config: SamplerConfig) -> tuple[torch.Tensor, torch.Tensor]:
        uniform = np.linspace(1, 0, config.num_steps + 1)[:-1].astype(np.float32)
        sigmas = shift_sigmas(uniform, config.shift)
        timesteps = torch.from_numpy(sigmas) * config.num_train_timesteps
        return with_final_zero(sigmas), timesteps

    def _clear_history(self) -> None:
        pass  # Euler is one-step: nothing to remember

    def _advance(self, velocity: torch.Tensor, sample: torch.Tensor, index: int) -> torch.Tensor:
        dt = (self._sigmas[index + 1] - self._sigmas[index]).item()
        return sample + dt * velocity
