"""UserParams / SystemParams: defaults, validation and the wording of rejections."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from smartdiff.api.params import CachePolicy, SystemParams, UserParams


def _error(cls: type[Any], **kwargs: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        cls(**kwargs)
    return str(caught.value)


def test_user_defaults_are_the_wan_reference_settings() -> None:
    params = UserParams(prompt="a cat surfing")
    assert (params.model, params.width, params.height, params.frames, params.fps) == (
        "wan2.1-t2v-1.3b",
        832,
        480,
        81,
        16,
    )
    assert (params.steps, params.guidance_scale, params.shift, params.solver) == (
        50,
        5.0,
        5.0,
        "unipc",
    )
    assert params.seed is None and params.negative_prompt == ""
    assert params.cache == CachePolicy(policy="none", threshold=None)


@pytest.mark.parametrize(
    ("guidance", "expected"), [(0.0, False), (1.0, False), (1.01, True), (5.0, True)]
)
def test_do_cfg_follows_diffusers(guidance: float, expected: bool) -> None:
    assert UserParams(prompt="x", guidance_scale=guidance).do_cfg is expected


@pytest.mark.parametrize(
    ("field", "value", "fragments"),
    [
        ("frames", 80, ["frames=80 is not allowed", "4n+1", "77 or 81"]),
        ("frames", 0, ["frames=0", "4n+1"]),
        ("frames", 1029, ["frames=1029", "1025"]),
        ("width", 830, ["width=830 is not allowed", "multiple of 16", "816 or 832"]),
        ("height", 8, ["height=8", "between 16 and 4096"]),
        ("height", 4112, ["height=4112", "4096"]),
        ("fps", 0, ["fps=0", "between 1 and 120"]),
        ("steps", 1001, ["steps=1001", "between 1 and 1000"]),
        ("guidance_scale", 50.5, ["guidance_scale=50.5", "at most 50"]),
        ("guidance_scale", -1.0, ["guidance_scale=-1.0", "at least 0"]),
        ("guidance_scale", float("nan"), ["guidance_scale=nan"]),
        ("shift", 0.0, ["shift=0.0", "greater than 0"]),
        ("shift", 101.0, ["shift=101.0", "at most 100"]),
        ("seed", -1, ["seed=-1", "between 0 and 9223372036854775807"]),
        ("seed", 2**63, ["seed=9223372036854775808"]),
        ("solver", "ddim", ["solver='ddim' is not allowed", "'unipc', 'dpm++', 'euler'"]),
        ("prompt", "   ", ["prompt='   '", "non-whitespace"]),
        ("prompt", "x" * 10_001, ["10001 characters", "at most 10000"]),
        ("model", "../etc", ["model='../etc'", "model name"]),
        ("frames", "81", ["frames", "valid integer", "'81'"]),
        ("width", 832.0, ["width", "valid integer"]),
        ("steps", True, ["steps", "valid integer"]),
        ("cache", {"threshold": 0.1}, ["cache.threshold=0.1", "policy is 'none'"]),
        ("cache", {"policy": "magic"}, ["cache.policy='magic'", "teacache"]),
        ("cache", {"policy": "teacache", "threshold": -0.5}, ["cache.threshold=-0.5"]),
    ],
)
def test_user_rejections_name_field_value_and_allowed(
    field: str, value: Any, fragments: list[str]
) -> None:
    kwargs: dict[str, Any] = {"prompt": "a cat", field: value}
    message = _error(UserParams, **kwargs)
    assert field.split(".")[0] in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("frames", [1, 5, 77, 81, 121, 1025])
def test_valid_frame_counts(frames: int) -> None:
    assert UserParams(prompt="x", frames=frames).frames == frames


def test_user_params_are_frozen_and_closed() -> None:
    params = UserParams(prompt="x")
    with pytest.raises(ValidationError):
        params.steps = 10  # type: ignore[misc]
    assert "extra" in _error(UserParams, prompt="x", stepz=10).lower()
    assert "prompt" in _error(UserParams)


def test_cache_policy_accepts_threshold_with_a_policy() -> None:
    params = UserParams(prompt="x", cache=CachePolicy(policy="teacache", threshold=0.2))
    assert params.cache.threshold == 0.2


def test_system_defaults_and_world_size() -> None:
    system = SystemParams()
    assert (system.device, system.dtype, system.attention) == ("auto", "bfloat16", "auto")
    assert (system.memory_level, system.cfg, system.ulysses, system.ring) == (0, 1, 1, 1)
    assert SystemParams(cfg=2, ulysses=4, ring=2, device="cuda:3").world_size == 16


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("cfg", 3, "cfg must be 1 or 2"),
        ("ulysses", 0, "ulysses=0"),
        ("ring", -2, "ring=-2"),
        ("memory_level", 4, "between 0 and 3"),
        ("dtype", "fp8", "'bfloat16', 'float16', 'float32'"),
        ("device", "CUDA 0", "device='CUDA 0'"),
        ("attention", "", "attention=''"),
    ],
)
def test_system_rejections(field: str, value: Any, fragment: str) -> None:
    message = _error(SystemParams, **{field: value})
    assert field in message and fragment in message, message
