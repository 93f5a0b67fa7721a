"""The sampler configuration: one frozen, validated dataclass shared by every solver.

Role: carries what a flow-matching sampler needs to build its noise schedule and
pick its update order (step count, timestep shift, training horizon, solver order).
The generator builds one from the request's ``UserParams`` (steps, shift) and hands
it to ``smartdiff.samplers.make_sampler``. Errors name the field, the offending
value and what is allowed, in the wording ``smartdiff.api.checks`` uses.

Talks to: nothing (stdlib only; importable without torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

SOLVER_ORDER_MAX: Final = 3


def _rejection(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not allowed: {allowed}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplerConfig:
    """What a flow-matching sampler is asked to do for one request.

    Args:
        num_steps: Denoising steps (model evaluations), at least 1.
        shift: Timestep shift ``s``; a sigma ``t`` on the uniform grid becomes
            ``s * t / (1 + (s - 1) * t)``. Must be finite and > 0; 1 means no shift.
            Wan2.1 uses 5.0 at 720p and 3.0 at 480p.
        num_train_timesteps: The training horizon ``T``; the model's timestep is
            ``sigma * T``. At least 1 (Wan: 1000).
        solver_order: Order of the multistep solvers (``unipc``, ``dpm++``), 1 to 3.
            Wan uses 2. Ignored by ``euler``, which is first order.
    """

    num_steps: int
    shift: float
    num_train_timesteps: int = 1000
    solver_order: int = 2

    def __post_init__(self) -> None:
        if not _is_int(self.num_steps) or self.num_steps < 1:
            raise _rejection("num_steps", self.num_steps, "num_steps must be an integer >= 1")
        if (
            isinstance(self.shift, bool)
            or not isinstance(self.shift, (int, float))
            or not math.isfinite(self.shift)
            or self.shift <= 0
        ):
            raise _rejection("shift", self.shift, "shift must be a finite number > 0")
        object.__setattr__(self, "shift", float(self.shift))
        if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 1:
            raise _rejection(
                "num_train_timesteps",
                self.num_train_timesteps,
                "num_train_timesteps must be an integer >= 1",
            )
        if not _is_int(self.solver_order) or not 1 <= self.solver_order <= SOLVER_ORDER_MAX:
            raise _rejection(
                "solver_order",
                self.solver_order,
                f"solver_order must be an integer between 1 and {SOLVER_ORDER_MAX}",
            )
