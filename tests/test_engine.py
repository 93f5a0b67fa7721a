"""The engine layers: torch-free scheduler and tasks, request checks, registry, and the tiny
random model end to end (progress, timings, determinism, failures, cancellation)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from smartdiff.api.params import CachePolicy, SystemParams, UserParams
from smartdiff.engine.pool import TaskPool
from smartdiff.engine.scheduler import FifoScheduler, TaskOutcome
from smartdiff.engine.task import Task, TaskStateError, TaskStatus

REPO = Path(__file__).resolve().parents[1]
TINY = "wan-tiny-random"


def tiny_params(**overrides: object) -> UserParams:
    fields: dict[str, object] = dict(
        model=TINY,
        prompt="a lighthouse at dusk",
        width=32,
        height=32,
        frames=5,
        steps=3,
        guidance_scale=4.0,
        seed=7,
    )
    fields.update(overrides)
    return UserParams(**fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------ torch-free layers


def test_scheduler_task_pool_and_request_import_no_torch() -> None:
    code = textwrap.dedent("""
        import sys
        from smartdiff.api.params import UserParams
        from smartdiff.engine.pool import TaskPool
        from smartdiff.engine.request import check_request
        from smartdiff.engine.scheduler import FifoScheduler, TaskOutcome
        from smartdiff.engine.task import Task
        s = FifoScheduler(TaskPool())
        tasks = [Task(UserParams(prompt=f"p{i}"), id=f"t{i}") for i in range(3)]
        for t in tasks:
            s.add_request(t)
        order = []
        while s.has_unfinished():
            (task,) = s.schedule().tasks
            order.append(task.id)
            s.update_from_output([TaskOutcome(task.id)])
        assert order == ["t0", "t1", "t2"], order
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    env_path = f"{REPO / 'runtime'}"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_fifo_runs_one_task_at_a_time_in_order() -> None:
    scheduler = FifoScheduler(TaskPool())
    tasks = [Task(tiny_params(), id=name) for name in ("a", "b", "c")]
    for task in tasks:
        scheduler.add_request(task)
    first = scheduler.schedule()
    assert [t.id for t in first.tasks] == ["a"]
    assert scheduler.schedule().tasks == first.tasks  # still running: the same task again
    assert [t.status for t in tasks] == [TaskStatus.RUNNING, TaskStatus.WAITING, TaskStatus.WAITING]
    finished = scheduler.update_from_output([TaskOutcome("a")])
    assert finished == [tasks[0]] and tasks[0].status is TaskStatus.SUCCEEDED
    assert [t.id for t in scheduler.schedule().tasks] == ["b"]
    scheduler.update_from_output([TaskOutcome("b", error="RuntimeError: boom")])
    assert tasks[1].status is TaskStatus.FAILED and tasks[1].error == "RuntimeError: boom"
    assert [t.id for t in scheduler.schedule().tasks] == ["c"]
    scheduler.update_from_output([TaskOutcome("c")])
    assert scheduler.schedule().is_empty and not scheduler.has_unfinished()


def test_fifo_cancellation_and_misuse() -> None:
    scheduler = FifoScheduler(TaskPool())
    a, b, c = (Task(tiny_params(), id=name) for name in "abc")
    for task in (a, b, c):
        scheduler.add_request(task)
    with pytest.raises(ValueError, match="already queued"):
        scheduler.add_request(a)
    assert scheduler.finish_requests(["b"]) == [b]  # cancelled while waiting: skipped
    assert b.status is TaskStatus.CANCELLED
    assert [t.id for t in scheduler.schedule().tasks] == ["a"]
    scheduler.finish_requests(["a"], reason="deadline")  # cancelled while running
    assert a.status is TaskStatus.CANCELLED and a.error == "deadline"
    with pytest.raises(ValueError, match="running task is 'a'"):
        scheduler.update_from_output([TaskOutcome("c")])
    scheduler.update_from_output([TaskOutcome("a", cancelled=True)])
    assert [t.id for t in scheduler.schedule().tasks] == ["c"]
    with pytest.raises(KeyError, match="no task with id 'zzz'"):
        scheduler.finish_requests(["zzz"])


def test_task_lifecycle() -> None:
    task = Task(tiny_params(seed=None))
    assert task.status is TaskStatus.WAITING and not task.finished
    assert isinstance(task.seed, int) and 0 <= task.seed < 2**63  # drawn, then fixed
    assert Task(tiny_params(seed=42)).seed == 42
    with pytest.raises(TaskStateError, match="cannot go from waiting to succeeded"):
        task.succeed()
    task.start()
    task.set_progress(2, 3)
    assert (task.step, task.total_steps) == (2, 3)
    with pytest.raises(ValueError, match="step must be in"):
        task.set_progress(4, 3)
    task.succeed()
    assert task.finished and task.finished_at is not None
    with pytest.raises(TaskStateError, match="allowed from succeeded: none"):
        task.cancel()
    pool = TaskPool()
    pool.add(task)
    with pytest.raises(ValueError, match="already in the pool"):
        pool.add(task)
    assert pool.remove(task.id) is task and len(pool) == 0


# --------------------------------------------------- requests rejected before loading


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any model construction fail the test."""
    from smartdiff.engine import backend

    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(backend, "_random_components", forbidden)
    monkeypatch.setattr(backend, "_load_components", forbidden)


def test_bad_params_rejected_before_any_model_loads(no_loading: None) -> None:
    from smartdiff.engine.backend import Backend
    from smartdiff.engine.engine import Engine
    from smartdiff.engine.request import RequestError, check_request
    from smartdiff.models.registry import UnknownModelError, load_model_config

    with pytest.raises(ValidationError, match="frames must be 4n\\+1"):
        tiny_params(frames=6)
    with pytest.raises(ValidationError, match="width must be a multiple of 16"):
        tiny_params(width=40)
    with pytest.raises(UnknownModelError, match="known models: .*wan-tiny-random"):
        Engine.from_params("wan9-video", SystemParams(device="cpu"))
    model = load_model_config(TINY)
    with pytest.raises(RequestError, match="model='wan2.1-t2v-1.3b' is not allowed"):
        check_request(tiny_params(model="wan2.1-t2v-1.3b"), model)
    check_request(tiny_params(cache=CachePolicy(policy="teacache")), model)  # supported now
    with pytest.raises(ValueError, match="needs weights_path"):
        Backend.from_params("wan2.1-t2v-1.3b", SystemParams(device="cpu"))
    with pytest.raises(ValueError, match="world size 2"):
        Backend.from_params(model, SystemParams(device="cpu", cfg=2))
    with pytest.raises(ValueError, match="attention='nope' is not allowed"):
        Backend.from_params(model, SystemParams(device="cpu", attention="nope"))


def test_registry_configs() -> None:
    from smartdiff.models.registry import known_models, load_model_config

    assert {"wan2.1-t2v-1.3b", "wan2.1-t2v-14b", TINY} <= set(known_models())
    small, large = load_model_config("wan2.1-t2v-1.3b"), load_model_config("wan2.1-t2v-14b")
    assert (small.dit.dim, small.dit.num_layers, small.dit.num_heads) == (1536, 30, 12)
    assert (large.dit.dim, large.dit.num_layers, large.dit.num_heads) == (5120, 40, 40)
    assert small.text_encoder.d_model == large.dit.text_dim == 4096
    assert small.latent_shape(81, 480, 832) == (16, 21, 60, 104)
    tiny = load_model_config(TINY)
    assert tiny.random_weights and tiny.dit.num_layers == 2 and tiny.dit.num_heads == 2


def test_registry_errors_name_file_and_field(tmp_path: Path) -> None:
    from smartdiff.models.registry import ModelConfigError, UnknownModelError, load_model_config

    text = (REPO / "configs/models/wan-tiny-random.yaml").read_text()
    (tmp_path / "broken.yaml").write_text(
        text.replace("name: wan-tiny-random", "name: broken").replace("ffn_dim: 48", "ffn_dims: 48")
    )
    with pytest.raises(ModelConfigError, match="unknown keys \\['ffn_dims'\\] in 'dit'"):
        load_model_config("broken", tmp_path)
    (tmp_path / "broken.yaml").write_text(
        text.replace("name: wan-tiny-random", "name: broken").replace(
            "text_dim: 32", "text_dim: 64"
        )
    )
    with pytest.raises(ModelConfigError, match="dit.text_dim \\(64\\) must equal"):
        load_model_config("broken", tmp_path)
    with pytest.raises(UnknownModelError, match="known models: broken"):
        load_model_config("other", tmp_path)


# ------------------------------------------------------------- the tiny model, end to end


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    from smartdiff.engine.engine import Engine

    return Engine.from_params(TINY, SystemParams(device="cpu", dtype="float32"))


def test_progress_callback_timings_and_video(engine) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    import torch

    from smartdiff.engine.generator import to_uint8_frames

    calls: list[tuple[str, int, int]] = []
    engine.on_step = lambda task, step, total: calls.append((task.id, step, total))
    try:
        task = engine.submit(tiny_params(steps=3))
        assert engine.run_until_idle() == [task]
    finally:
        engine.on_step = None
    assert task.status is TaskStatus.SUCCEEDED, task.error
    assert calls == [(task.id, 1, 3), (task.id, 2, 3), (task.id, 3, 3)]
    assert (task.step, task.total_steps) == (3, 3)
    assert set(task.timings) == {"encode", "denoise", "decode"}
    assert all(seconds > 0 for seconds in task.timings.values())
    video = task.video
    assert video.shape == (1, 3, 5, 32, 32) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1 and video.std() > 0
    frames = to_uint8_frames(video)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    expected = ((video[0, :, 2, 3, 4] + 1) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(frames[2, 3, 4], expected)


def test_same_seed_same_video_and_no_cfg(engine) -> None:  # type: ignore[no-untyped-def]
    import torch

    first, second, other = (engine.submit(tiny_params(seed=s)) for s in (3, 3, 4))
    unguided = engine.submit(tiny_params(seed=3, guidance_scale=1.0))
    engine.run_until_idle()
    assert torch.equal(first.video, second.video)
    assert not torch.equal(first.video, other.video)
    assert unguided.buffers.negative_embeds is None
    assert not torch.equal(first.video, unguided.video)


def test_failing_task_does_not_stop_the_engine(engine) -> None:  # type: ignore[no-untyped-def]
    def explode(task: Task, step: int, total: int) -> None:
        if task.id == "bad" and step == 2:
            raise RuntimeError("progress sink broke")

    engine.on_step = explode
    try:
        bad = engine.submit(tiny_params(), task_id="bad")
        good = engine.submit(tiny_params(), task_id="good")
        assert engine.run_until_idle() == [bad, good]
    finally:
        engine.on_step = None
    assert bad.status is TaskStatus.FAILED
    assert bad.error == "RuntimeError: progress sink broke" and bad.step == 2
    assert good.status is TaskStatus.SUCCEEDED
    assert engine.release("bad") is bad and "bad" not in engine.pool


def test_cancel_a_running_task_stops_it(engine) -> None:  # type: ignore[no-untyped-def]
    def cancel_at_first_step(task: Task, step: int, total: int) -> None:
        engine.cancel(task.id, reason="deadline exceeded")

    engine.on_step = cancel_at_first_step
    try:
        task = engine.submit(tiny_params(steps=3))
        engine.run_until_idle()
    finally:
        engine.on_step = None
    assert task.status is TaskStatus.CANCELLED and task.error == "deadline exceeded"
    assert task.step == 1 and task.video is None
