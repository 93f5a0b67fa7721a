"""One generation request as it moves through the engine: parameters, state, buffers, progress.

:class:`Task` is created by the engine from a validated :class:`~smartdiff.api.params.UserParams`,
kept in the :class:`~smartdiff.engine.pool.TaskPool`, ordered by the
:class:`~smartdiff.engine.scheduler.Scheduler` and filled in by the
:class:`~smartdiff.engine.generator.Generator` (embeddings, latents, the decoded video, the
progress and the timing of each stage). Callers (the CLI, the status reporter) read ``status``,
``step``/``total_steps``, ``timings``, ``error`` and ``video``.

This module imports no torch: tensors are held as opaque values, so the scheduler and its tests
run without it.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smartdiff.api.params import UserParams


SEED_LIMIT = 2**63  # seeds are drawn from [0, 2**63), the range UserParams accepts


class TaskStatus(StrEnum):
    """Lifecycle: WAITING -> RUNNING -> SUCCEEDED | FAILED; WAITING or RUNNING -> CANCELLED."""

    WAITING = "waiting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether the task reached a final state."""
        return self in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)


_ALLOWED_TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.WAITING: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED}),
    TaskStatus.RUNNING: frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED}),
    TaskStatus.SUCCEEDED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}


class TaskStateError(RuntimeError):
    """A task was asked to move to a state its current state does not lead to."""


class TaskCancelled(Exception):  # noqa: N818 -- a signal, not an error
    """Raised inside the generator when the task it works on was cancelled meanwhile."""


@dataclass(eq=False)
class TaskBuffers:
    """Tensors of one task, filled stage by stage (``None`` until the stage ran).

    Attributes:
        prompt_embeds: ``[1, L, text_dim]`` conditional text embeddings.
        negative_embeds: ``[1, L, text_dim]`` unconditional embeddings (``None`` without CFG).
        latents: ``[1, 16, F', H/8, W/8]`` fp32, the current (then final) latents.
        video: ``[1, 3, T, H, W]`` fp32 on CPU in ``[-1, 1]``, the decoded video.
    """

    prompt_embeds: Any = None
    negative_embeds: Any = None
    latents: Any = None
    video: Any = None

    def clear_intermediate(self) -> None:
        """Drop embeddings and latents (keeps ``video``) to free device memory."""
        self.prompt_embeds = None
        self.negative_embeds = None
        self.latents = None


@dataclass(eq=False)
class Task:
    """A request in the engine.

    Attributes:
        id: unique id (given by the caller or a random hex string).
        params: the validated user parameters.
        seed: the noise seed used: ``params.seed``, or a fresh random one when that is None
            (recorded so a run can be repeated).
        status: see :class:`TaskStatus`; change it only through the methods below.
        buffers: tensors of the stages (:class:`TaskBuffers`).
        step / total_steps: denoising progress (``total_steps`` is known once it starts).
        timings: seconds per stage (``encode``, ``denoise``, ``decode``, ...).
        error: ``"ExceptionType: message"`` when FAILED, a reason when CANCELLED.
        created_at / started_at / finished_at: ``time.time()`` stamps.
    """

    params: UserParams
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    seed: int | None = None
    status: TaskStatus = TaskStatus.WAITING
    buffers: TaskBuffers = field(default_factory=TaskBuffers)
    step: int = 0
    total_steps: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"Task.id must be a non-empty string, got {self.id!r}")
        if self.seed is None:
            self.seed = (
                self.params.seed if self.params.seed is not None else secrets.randbelow(SEED_LIMIT)
            )

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def cancelled(self) -> bool:
        return self.status is TaskStatus.CANCELLED

    @property
    def video(self) -> Any:
        """The decoded video ``[1, 3, T, H, W]`` in ``[-1, 1]`` once SUCCEEDED, else ``None``."""
        return self.buffers.video

    def _move(self, target: TaskStatus) -> None:
        if target not in _ALLOWED_TRANSITIONS[self.status]:
            allowed = ", ".join(s.value for s in _ALLOWED_TRANSITIONS[self.status]) or "none"
            raise TaskStateError(
                f"task {self.id}: cannot go from {self.status.value} to {target.value} "
                f"(allowed from {self.status.value}: {allowed})"
            )
        self.status = target

    def start(self) -> None:
        """WAITING -> RUNNING."""
        self._move(TaskStatus.RUNNING)
        self.started_at = time.time()

    def set_progress(self, step: int, total_steps: int) -> None:
        """Record that ``step`` of ``total_steps`` denoising steps are done."""
        if not 0 <= step <= total_steps:
            raise ValueError(f"task {self.id}: step must be in [0, {total_steps}], got {step}")
        self.step, self.total_steps = step, total_steps

    def succeed(self) -> None:
        """RUNNING -> SUCCEEDED."""
        self._move(TaskStatus.SUCCEEDED)
        self.finished_at = time.time()

    def fail(self, error: str) -> None:
        """RUNNING -> FAILED with a message; intermediate buffers are dropped."""
        self._move(TaskStatus.FAILED)
        self.error = error
        self.finished_at = time.time()
        self.buffers.clear_intermediate()

    def cancel(self, reason: str = "cancelled") -> None:
        """WAITING or RUNNING -> CANCELLED; a running generator stops at its next step."""
        self._move(TaskStatus.CANCELLED)
        self.error = reason
        self.finished_at = time.time()

    def raise_if_cancelled(self) -> None:
        """Raise :class:`TaskCancelled` if the task was cancelled (the generator's check)."""
        if self.cancelled:
            raise TaskCancelled(f"task {self.id} was cancelled: {self.error}")
