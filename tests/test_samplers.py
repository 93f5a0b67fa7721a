"""The flow-matching samplers against diffusers' schedulers, step by step.

For each solver and several (steps, shift) pairs, our ``timesteps`` and ``sigmas``
must equal the diffusers scheduler's exactly, and a full denoising loop driven by a
deterministic fake model (``v = 0.1 * x + sin(3 t / T) * w`` for a fixed random ``w``)
must give every step's output within 1e-6 (relative, fp32) of the diffusers
scheduler fed the same inputs. The references:

- ``unipc``: ``UniPCMultistepScheduler(prediction_type="flow_prediction",
  use_flow_sigmas=True, flow_shift=shift)`` (solver_order 2, bh2, as Wan2.1 ships it),
  ``set_timesteps(N)``;
- ``dpm++``: ``DPMSolverMultistepScheduler`` with the same flow options, ``set_timesteps(N)``;
- ``euler``: ``FlowMatchEulerDiscreteScheduler(shift=shift)``,
  ``set_timesteps(sigmas=linspace(1, 0, N + 1)[:N])`` (Wan's official shifted grid).

Also: the registry's errors, config validation, step ordering, ``reset``, dtypes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from smartdiff.samplers import SOLVER_NAMES, SOLVERS, SamplerConfig, make_sampler
from smartdiff.samplers.base import FlowSampler

# diffusers' DPM scheduler trips a numpy 2 deprecation in set_timesteps; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CASES = [(10, 5.0), (50, 3.0), (4, 1.0), (25, 8.0)]
EDGE_CASES = [(1, 5.0), (2, 3.0), (14, 5.0), (16, 0.5)]
SHAPE = (1, 4, 3, 6, 5)  # batch, latent channels, frames, height, width
T = 1000


def reference(solver: str, steps: int, shift: float, order: int = 2) -> Any:
    """The diffusers scheduler our ``solver`` must equal, with its timesteps set."""
    scheduler: Any
    if solver == "unipc":
        scheduler = UniPCMultistepScheduler(
            num_train_timesteps=T,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            solver_order=order,
            predict_x0=True,
            solver_type="bh2",
            lower_order_final=True,
            final_sigmas_type="zero",
        )
        scheduler.set_timesteps(steps)
    elif solver == "dpm++":
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=T,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            algorithm_type="dpmsolver++",
            solver_type="midpoint",
            solver_order=order,
            lower_order_final=True,
            final_sigmas_type="zero",
        )
        scheduler.set_timesteps(steps)
    elif solver == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
        scheduler.set_timesteps(sigmas=np.linspace(1, 0, steps + 1)[:steps])
    else:
        raise AssertionError(solver)
    return scheduler


def fake_velocity(sample: torch.Tensor, timestep: float, pattern: torch.Tensor) -> torch.Tensor:
    return 0.1 * sample + math.sin(3.0 * timestep / T) * pattern


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=generator)
    pattern = torch.randn(SHAPE, generator=generator)
    return noise, pattern


def assert_step_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
    relative = ((ours - theirs).norm() / theirs.norm()).item()
    assert relative <= 1e-6, f"{what}: relative error {relative:.3e} > 1e-6"
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, msg=what)


def run_side_by_side(solver: str, steps: int, shift: float, order: int = 2) -> None:
    scheduler = reference(solver, steps, shift, order)
    sampler = make_sampler(solver, SamplerConfig(num_steps=steps, shift=shift, solver_order=order))

    assert sampler.timesteps.dtype == torch.float32
    assert torch.equal(sampler.timesteps, scheduler.timesteps.to(torch.float32))
    assert sampler.sigmas.dtype == torch.float32
    assert torch.equal(sampler.sigmas, scheduler.sigmas)
    assert sampler.sigmas[-1].item() == 0.0

    noise, pattern = inputs()
    theirs = noise.clone()
    ours = noise.clone()
    for index, timestep in enumerate(scheduler.timesteps):
        assert sampler.timesteps[index].item() == float(timestep)
        # Each side evaluates the fake model on its own sample, as in a real loop.
        velocity_theirs = fake_velocity(theirs, float(timestep), pattern)
        velocity_ours = fake_velocity(ours, sampler.timesteps[index].item(), pattern)
        theirs = scheduler.step(velocity_theirs, timestep, theirs, return_dict=False)[0]
        ours = sampler.step(velocity_ours, ours, index)
        assert_step_close(ours, theirs, f"{solver} steps={steps} shift={shift} step {index}")
    assert sampler.next_step_index == steps


@pytest.mark.parametrize(("steps", "shift"), CASES)
@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_matches_diffusers(solver: str, steps: int, shift: float) -> None:
    run_side_by_side(solver, steps, shift)


@pytest.mark.parametrize(("steps", "shift"), EDGE_CASES)
@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_matches_diffusers_few_steps_and_small_shift(solver: str, steps: int, shift: float) -> None:
    run_side_by_side(solver, steps, shift)


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_matches_diffusers_other_orders(solver: str, order: int) -> None:
    run_side_by_side(solver, 12, 5.0, order)
    run_side_by_side(solver, 14, 5.0, order)  # DPM++: second-to-last step drops to order 2
    run_side_by_side(solver, 20, 3.0, order)


@pytest.mark.parametrize(("steps", "shift"), CASES)
def test_euler_grid_is_wans_shift_formula(steps: int, shift: float) -> None:
    """Wan's official grid: shift * s / (1 + (shift - 1) * s) on linspace(1, 0, N + 1)[:N]."""
    uniform = np.linspace(1, 0, steps + 1)[:steps]
    wan = shift * uniform / (1 + (shift - 1) * uniform)
    sampler = make_sampler("euler", SamplerConfig(num_steps=steps, shift=shift))
    expected = torch.from_numpy(np.append(wan, 0.0)).to(torch.float32)
    torch.testing.assert_close(sampler.sigmas, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(sampler.timesteps, expected[:-1] * T, rtol=1e-6, atol=0)


def test_unipc_timesteps_are_truncated_sigmas() -> None:
    sampler = make_sampler("unipc", SamplerConfig(num_steps=10, shift=5.0))
    assert sampler.timesteps[0].item() == 999.0  # sigma_0 = 1 - 1e-6
    assert torch.equal(sampler.timesteps, torch.trunc(sampler.timesteps))
    assert bool((sampler.timesteps <= sampler.sigmas[:-1] * T).all())


def test_low_precision_model_output_is_upcast_first() -> None:
    """A bf16 velocity is upcast before the update: equal to diffusers fed its fp32 copy."""
    scheduler = reference("unipc", 8, 5.0)
    sampler = make_sampler("unipc", SamplerConfig(num_steps=8, shift=5.0))
    noise, pattern = inputs(1)
    theirs, ours = noise.clone(), noise.clone()
    for index, timestep in enumerate(scheduler.timesteps):
        velocity = fake_velocity(ours, float(timestep), pattern).to(torch.bfloat16)
        theirs = scheduler.step(velocity.float(), timestep, theirs, return_dict=False)[0]
        ours = sampler.step(velocity, ours, index)
        assert ours.dtype == torch.float32
        assert_step_close(ours, theirs, f"bf16 velocity, step {index}")


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_low_precision_sample_is_computed_in_fp32(solver: str) -> None:
    """bf16 in, bf16 out, and each step is the fp32 step of the same values, rounded once."""
    config = SamplerConfig(num_steps=4, shift=3.0)
    low, high = make_sampler(solver, config), make_sampler(solver, config)
    noise, pattern = inputs(4)
    sample = noise.to(torch.bfloat16)
    for index, timestep in enumerate(low.timesteps.tolist()):
        velocity = fake_velocity(sample.float(), timestep, pattern).to(torch.bfloat16)
        expected = high.step(velocity.float(), sample.float(), index).to(torch.bfloat16)
        sample = low.step(velocity, sample, index)
        assert sample.dtype == torch.bfloat16
        assert torch.equal(sample, expected), f"{solver} step {index}"
    sampler = make_sampler(solver, config)
    sample64 = torch.randn(SHAPE, dtype=torch.float64)
    assert sampler.step(torch.ones(SHAPE), sample64, 0).dtype == torch.float64


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_reset_and_independent_samplers(solver: str) -> None:
    """Two samplers interleaved, and one sampler reset, all give the same outputs."""
    config = SamplerConfig(num_steps=6, shift=5.0)
    first, second = make_sampler(solver, config), make_sampler(solver, config)
    noise, pattern = inputs(2)
    a, b = noise.clone(), noise.clone()
    outputs = []
    for index, timestep in enumerate(first.timesteps.tolist()):
        a = first.step(fake_velocity(a, timestep, pattern), a, index)
        b = second.step(fake_velocity(b, timestep, pattern), b, index)
        assert torch.equal(a, b)
        outputs.append(a)
    first.reset()
    assert first.next_step_index == 0
    c = noise.clone()
    for index, timestep in enumerate(first.timesteps.tolist()):
        c = first.step(fake_velocity(c, timestep, pattern), c, index)
        assert torch.equal(c, outputs[index])


def test_inputs_are_not_modified() -> None:
    sampler = make_sampler("unipc", SamplerConfig(num_steps=4, shift=5.0))
    noise, pattern = inputs(3)
    sample = noise.clone()
    velocity = fake_velocity(sample, 999.0, pattern)
    kept_sample, kept_velocity = sample.clone(), velocity.clone()
    sampler.step(velocity, sample, 0)
    assert torch.equal(sample, kept_sample) and torch.equal(velocity, kept_velocity)


def test_steps_must_run_in_order() -> None:
    sampler = make_sampler("dpm++", SamplerConfig(num_steps=2, shift=5.0))
    sample = torch.randn(SHAPE)
    with pytest.raises(ValueError, match=r"step_index=1 is not allowed: .*next one is 0"):
        sampler.step(sample, sample, 1)
    sample = sampler.step(sample, sample, 0)
    sample = sampler.step(sample, sample, 1)
    with pytest.raises(ValueError, match=r"step_index=2 is not allowed: all 2 steps are done"):
        sampler.step(sample, sample, 2)


def test_shape_and_dtype_mismatches_are_rejected() -> None:
    sampler = make_sampler("euler", SamplerConfig(num_steps=2, shift=5.0))
    with pytest.raises(ValueError, match=r"model_output.shape=\(1, 4\) is not allowed"):
        sampler.step(torch.zeros(1, 4), torch.zeros(1, 5), 0)
    with pytest.raises(TypeError, match=r"sample.dtype=torch.int64 is not allowed"):
        sampler.step(torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.int64), 0)


@pytest.mark.parametrize("name", ["ddim", "UniPC", "dpm", "", None])
def test_unknown_solver_lists_valid_names(name: object) -> None:
    with pytest.raises(ValueError) as caught:
        make_sampler(name, SamplerConfig(num_steps=4, shift=5.0))  # type: ignore[arg-type]
    message = str(caught.value)
    assert f"solver={name!r} is not allowed" in message
    for valid in ("'unipc'", "'dpm++'", "'euler'"):
        assert valid in message
    with pytest.raises(KeyError, match="solver must be one of"):
        SOLVERS["ddim"]


def test_registry_maps_names_to_classes() -> None:
    assert SOLVER_NAMES == ("unipc", "dpm++", "euler")
    assert list(SOLVERS) == list(SOLVER_NAMES) and len(SOLVERS) == 3
    for name in SOLVER_NAMES:
        sampler_class = SOLVERS[name]
        assert issubclass(sampler_class, FlowSampler) and sampler_class.name == name
        assert isinstance(make_sampler(name, SamplerConfig(num_steps=2, shift=1.0)), sampler_class)


@pytest.mark.parametrize(
    ("fields", "field", "value"),
    [
        ({"num_steps": 0, "shift": 5.0}, "num_steps", "0"),
        ({"num_steps": -3, "shift": 5.0}, "num_steps", "-3"),
        ({"num_steps": 2.5, "shift": 5.0}, "num_steps", "2.5"),
        ({"num_steps": True, "shift": 5.0}, "num_steps", "True"),
        ({"num_steps": 10, "shift": 0.0}, "shift", "0.0"),
        ({"num_steps": 10, "shift": -1.0}, "shift", "-1.0"),
        ({"num_steps": 10, "shift": float("nan")}, "shift", "nan"),
        ({"num_steps": 10, "shift": float("inf")}, "shift", "inf"),
        ({"num_steps": 10, "shift": "5"}, "shift", "'5'"),
        ({"num_steps": 10, "shift": 5.0, "num_train_timesteps": 0}, "num_train_timesteps", "0"),
        ({"num_steps": 10, "shift": 5.0, "solver_order": 0}, "solver_order", "0"),
        ({"num_steps": 10, "shift": 5.0, "solver_order": 4}, "solver_order", "4"),
    ],
)
def test_bad_config_names_the_field(fields: dict[str, object], field: str, value: str) -> None:
    with pytest.raises(ValueError) as caught:
        SamplerConfig(**fields)  # type: ignore[arg-type]
    assert str(caught.value).startswith(f"{field}={value} is not allowed: {field} must be")


def test_config_is_frozen_and_shift_is_a_float() -> None:
    config = SamplerConfig(num_steps=10, shift=5)
    assert config.shift == 5.0 and isinstance(config.shift, float)
    with pytest.raises(AttributeError):
        config.num_steps = 20  # type: ignore[misc]
    with pytest.raises(TypeError, match="expected a SamplerConfig"):
        SOLVERS["euler"]({"num_steps": 10})  # type: ignore[arg-type]


def test_package_import_does_not_load_torch() -> None:
    code = (
        "import sys; import smartdiff.samplers as s; "
        "s.SamplerConfig(num_steps=2, shift=1.0); assert 'torch' not in sys.modules, 'torch'"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
