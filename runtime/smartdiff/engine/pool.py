"""The task pool: every task the engine knows, by id, in submission order.

The engine adds a task on submit; the scheduler looks tasks up here and the caller queries them
by id. The pool decides nothing about order or state (that is the scheduler's and the task's
job). Imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterator

from smartdiff.engine.task import Task, TaskStatus


class TaskPool:
    """Tasks by id, kept in submission order. Not thread-safe (the engine is one thread)."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def add(self, task: Task) -> None:
        """Add a task; its id must be new."""
        if task.id in self._tasks:
            raise ValueError(f"task id {task.id!r} is already in the pool")
        self._tasks[task.id] = task

    def get(self, task_id: str) -> Task:
        """The task with ``task_id``; a KeyError lists the known ids."""
        try:
            return self._tasks[task_id]
        except KeyError:
            known = ", ".join(self._tasks) or "none"
            raise KeyError(f"no task with id {task_id!r} (known ids: {known})") from None

    def remove(self, task_id: str) -> Task:
        """Remove and return a finished task (a live one must be cancelled first)."""
        task = self.get(task_id)
        if not task.finished:
            raise ValueError(
                f"task {task_id!r} is {task.status.value}; only finished tasks can be removed"
            )
        return self._tasks.pop(task_id)

    def with_status(self, *statuses: TaskStatus) -> list[Task]:
        """Tasks in any of ``statuses``, in submission order."""
        return [task for task in self._tasks.values() if task.status in statuses]

    def unfinished(self) -> list[Task]:
        """Tasks still WAITING or RUNNING, in submission order."""
        return [task for task in self._tasks.values() if not task.finished]

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(list(self._tasks.values()))
