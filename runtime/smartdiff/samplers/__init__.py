"""Flow-matching samplers (UniPC, DPM++, Euler) with the timestep shift.

Role: the registry the generator picks a solver from, by the request's ``solver``
name: ``make_sampler(name, SamplerConfig(num_steps=..., shift=...))`` returns a
fresh ``FlowSampler`` for one request, whose ``timesteps`` go to the DiT and whose
``step(model_output, sample, i)`` advances the latent. ``SOLVERS`` maps each name
to its class; the classes (and torch) load on first use, so importing this package,
``SamplerConfig`` or ``SOLVER_NAMES`` costs nothing.

- ``unipc``: UniPC multistep, bh2, order 2 (Wan2.1's default; diffusers'
  ``UniPCMultistepScheduler`` with flow sigmas).
- ``dpm++``: DPM-Solver++ multistep, order 2 (diffusers' ``DPMSolverMultistepScheduler``
  with flow sigmas).
- ``euler``: first-order Euler on Wan's shifted grid (diffusers'
  ``FlowMatchEulerDiscreteScheduler`` with explicit sigmas).

Talks to: ``config``; ``unipc``, ``dpm``, ``euler`` (lazily); used by the engine's
generator.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Final

from smartdiff.samplers.config import SamplerConfig

if TYPE_CHECKING:
    from smartdiff.samplers.base import FlowSampler

__all__ = ["SOLVERS", "SOLVER_NAMES", "SamplerConfig", "make_sampler"]

_SOLVER_PATHS: Final[Mapping[str, str]] = {
    "unipc": "smartdiff.samplers.unipc:UniPCSampler",
    "dpm++": "smartdiff.samplers.dpm:DPMSolverPPSampler",
    "euler": "smartdiff.samplers.euler:EulerSampler",
}

SOLVER_NAMES: Final[tuple[str, ...]] = tuple(_SOLVER_PATHS)
"""Valid solver names, in the order the user documentation lists them."""


def _unknown(name: object) -> ValueError:
    valid = ", ".join(repr(known) for known in SOLVER_NAMES)
    return ValueError(f"solver={name!r} is not allowed: solver must be one of {valid}")


class _SolverRegistry(Mapping[str, "type[FlowSampler]"]):
    """Read-only ``name -> sampler class``, importing a class when it is looked up."""

    def __getitem__(self, name: str) -> type[FlowSampler]:
        path = _SOLVER_PATHS.get(name) if isinstance(name, str) else None
        if path is None:
            raise KeyError(str(_unknown(name)))
        module_name, class_name = path.split(":")
        sampler_class: type[FlowSampler] = getattr(importlib.import_module(module_name), class_name)
        return sampler_class

    def __iter__(self) -> Iterator[str]:
        return iter(SOLVER_NAMES)

    def __len__(self) -> int:
        return len(SOLVER_NAMES)

    def __repr__(self) -> str:
        return f"SOLVERS({dict(_SOLVER_PATHS)!r})"


SOLVERS: Final[Mapping[str, type[FlowSampler]]] = _SolverRegistry()
"""Solver name -> ``FlowSampler`` subclass (``unipc``, ``dpm++``, ``euler``)."""


def make_sampler(name: str, config: SamplerConfig) -> FlowSampler:
    """A new sampler for one request: the solver ``name`` on ``config``'s schedule.

    Raises:
        ValueError: ``name`` is not one of ``SOLVER_NAMES`` (the message lists them).
        TypeError: ``config`` is not a ``SamplerConfig``.
    """
    if not isinstance(name, str) or name not in _SOLVER_PATHS:
        raise _unknown(name)
    return SOLVERS[name](config)
