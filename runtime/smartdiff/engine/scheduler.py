"""The scheduler: decides which task runs next; knows nothing about tensors.

The engine loop is ``schedule() -> run the scheduled tasks -> update_from_output(outcomes)``;
``add_request`` queues a new task and ``finish_requests`` ends tasks from outside (cancel).
:class:`Scheduler` is the interface (the shape of vLLM's), :class:`FifoScheduler` the seed
policy: first in, first out, one task at a time, each task run to completion. A priority or
batching policy is another subclass; the engine does not change.

Imports no torch, so policies are tested without it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from smartdiff.engine.pool import TaskPool
from smartdiff.engine.task import Task, TaskStatus


@dataclass(frozen=True)
class SchedulerOutput:
    """What to run now: the tasks, in order (empty when there is nothing to do)."""

    tasks: tuple[Task, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.tasks


@dataclass(frozen=True)
class TaskOutcome:
    """How running one scheduled task ended.

    Attributes:
        task_id: the task.
        error: ``None`` on success, else ``"ExceptionType: message"``.
        cancelled: the run stopped because the task was cancelled meanwhile.
    """

    task_id: str
    error: str | None = None
    cancelled: bool = False


class Scheduler(ABC):
    """Orders tasks. Implementations own the queue; the :class:`TaskPool` owns the tasks."""

    def __init__(self, pool: TaskPool) -> None:
        self.pool = pool

    @abstractmethod
    def add_request(self, task: Task) -> None:
        """Queue a WAITING task (adding it to the pool if needed)."""

    @abstractmethod
    def schedule(self) -> SchedulerOutput:
        """Pick the tasks to run now and mark them RUNNING."""

    @abstractmethod
    def update_from_output(self, outcomes: Sequence[TaskOutcome]) -> list[Task]:
        """Record how the scheduled tasks ended; return the tasks that finished."""

    @abstractmethod
    def finish_requests(self, task_ids: Iterable[str], reason: str = "cancelled") -> list[Task]:
        """Cancel WAITING or RUNNING tasks from outside; return those that were cancelled."""

    @abstractmethod
    def has_unfinished(self) -> bool:
        """Whether any queued or running task remains."""


class FifoScheduler(Scheduler):
    """First in, first out; one task at a time, run to completion."""

    def __init__(self, pool: TaskPool) -> None:
        super().__init__(pool)
        self._waiting: deque[str] = deque()
        self._running: str | None = None

    @property
    def running(self) -> Task | None:
        """The task being run, if any."""
        return None if self._running is None else self.pool.get(self._running)

    @property
    def waiting(self) -> list[Task]:
        """Queued tasks in the order they will run."""
        return [self.pool.get(task_id) for task_id in self._waiting]

    def add_request(self, task: Task) -> None:
        if task.status is not TaskStatus.WAITING:
            raise ValueError(
                f"task {task.id!r} is {task.status.value}; only a waiting task can be queued"
            )
        if task.id not in self.pool:
            self.pool.add(task)
        elif self.pool.get(task.id) is not task:
            raise ValueError(f"another task with id {task.id!r} is already in the pool")
        if task.id in self._waiting or task.id == self._running:
            raise ValueError(f"task {task.id!r} is already queued")
        self._waiting.append(task.id)

    def schedule(self) -> SchedulerOutput:
        if self._running is not None:
            return SchedulerOutput((self.pool.get(self._running),))
        while self._waiting:
            task = self.pool.get(self._waiting.popleft())
            if task.status is TaskStatus.WAITING:  # skip tasks cancelled while queued
                task.start()
                self._running = task.id
                return SchedulerOutput((task,))
        return SchedulerOutput()

    def update_from_output(self, outcomes: Sequence[TaskOutcome]) -> list[Task]:
        finished: list[Task] = []
        for outcome in outcomes:
            if outcome.task_id != self._running:
                raise ValueError(
                    f"outcome for task {outcome.task_id!r}, but the running task "
                    f"is {self._running!r}"
                )
            task = self.pool.get(outcome.task_id)
            self._running = None
            if task.status is TaskStatus.RUNNING:
                if outcome.cancelled:
                    task.cancel("cancelled while running")
                elif outcome.error is None:
                    task.succeed()
                else:
                    task.fail(outcome.error)
            finished.append(task)
        return finished

    def finish_requests(self, task_ids: Iterable[str], reason: str = "cancelled") -> list[Task]:
        cancelled: list[Task] = []
        for task_id in task_ids:
            task = self.pool.get(task_id)
            if task.finished:
                continue
            task.cancel(reason)
            if task_id in self._waiting:
                self._waiting.remove(task_id)
            cancelled.append(task)
        return cancelled

    def has_unfinished(self) -> bool:
        return self._running is not None or any(
            self.pool.get(task_id).status is TaskStatus.WAITING for task_id in self._waiting
        )
