"""The engine facade: submit requests, run them, read the results.

Wires the layers together: ``submit`` checks a :class:`~smartdiff.api.params.UserParams` against
the model (:func:`~smartdiff.engine.request.check_request`), wraps it in a
:class:`~smartdiff.engine.task.Task` and hands it to the
:class:`~smartdiff.engine.scheduler.Scheduler`; ``step`` asks the scheduler what to run, runs it
on the :class:`~smartdiff.engine.generator.Generator` and reports the outcome back;
``run_until_idle`` repeats until nothing is left. A failing task is marked FAILED with its error
and the engine goes on with the next one; nothing is raised to the caller for it.

Typical use (the CLI)::

    model = load_model_config(user.model)
    check_request(user, model)                      # fails fast, nothing loaded yet
    engine = Engine.from_params(model, system, weights_path=path, on_step=report)
    task = engine.submit(user)
    engine.run_until_idle()
    if task.status is TaskStatus.SUCCEEDED:
        write_mp4(to_uint8_frames(task.video), ..., fps=user.fps)
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable

from smartdiff.api.params import SystemParams, UserParams
from smartdiff.engine.backend import Backend
from smartdiff.engine.generator import Generator, GeneratorOptions, StepCallback
from smartdiff.engine.pool import TaskPool
from smartdiff.engine.request import check_request
from smartdiff.engine.scheduler import FifoScheduler, Scheduler, TaskOutcome
from smartdiff.engine.task import Task, TaskCancelled
from smartdiff.models.registry import ModelConfig, load_model_config
from smartdiff.parallel.groups import ParallelGroups

LOG = logging.getLogger(__name__)

FinishCallback = Callable[[Task], None]
"""``on_finish(task)``: called once per task when it reaches a final state inside ``step``."""


class Engine:
    """A backend, a generator, a task pool and a scheduler, driven by one thread.

    Args:
        backend: the loaded models.
        scheduler: the policy (default: :class:`FifoScheduler` over a new pool).
        options: generator options (CFG mode).
        on_step: progress callback ``on_step(task, step, total)``.
        on_finish: called with each task that finishes while the engine runs it.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        scheduler: Scheduler | None = None,
        options: GeneratorOptions | None = None,
        on_step: StepCallback | None = None,
        on_finish: FinishCallback | None = None,
    ) -> None:
        self.backend = backend
        self.scheduler = scheduler or FifoScheduler(TaskPool())
        self.generator = Generator(backend, options)
        self.on_step = on_step
        self.on_finish = on_finish

    @classmethod
    def from_params(
        cls,
        model: ModelConfig | str,
        system: SystemParams,
        *,
        weights_path: str | os.PathLike[str] | None = None,
        options: GeneratorOptions | None = None,
        on_step: StepCallback | None = None,
        on_finish: FinishCallback | None = None,
        groups: ParallelGroups | None = None,
    ) -> Engine:
        """Load the backend (see :meth:`Backend.from_params`; ``groups`` for a parallel
        launch) and build an engine on it."""
        config = load_model_config(model) if isinstance(model, str) else model
        backend = Backend.from_params(config, system, weights_path, groups=groups)
        return cls(backend, options=options, on_step=on_step, on_finish=on_finish)

    @property
    def pool(self) -> TaskPool:
        return self.scheduler.pool

    def submit(self, params: UserParams, task_id: str | None = None) -> Task:
        """Queue a request; raises :class:`~smartdiff.engine.request.RequestError` if it does not
        fit the model. Returns the WAITING task (its ``seed`` is fixed now)."""
        check_request(params, self.backend.model)
        task = Task(params) if task_id is None else Task(params, id=task_id)
        self.scheduler.add_request(task)
        return task

    def get(self, task_id: str) -> Task:
        return self.pool.get(task_id)

    def release(self, task_id: str) -> Task:
        """Forget a finished task (and its video); a long-lived engine calls this after use."""
        return self.pool.remove(task_id)

    def cancel(self, task_id: str, reason: str = "cancelled") -> None:
        """Cancel a waiting task, or stop a running one at its next step."""
        self.scheduler.finish_requests([task_id], reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[Task]:
        """Run what the scheduler picks now; return the tasks that finished."""
        scheduled = self.scheduler.schedule()
        outcomes = [self._run(task) for task in scheduled.tasks]
        finished = self.scheduler.update_from_output(outcomes)
        for task in finished:
            LOG.info(
                "task %s %s (timings %s)",
                task.id,
                task.status.value,
                {k: round(v, 3) for k, v in task.timings.items()},
            )
            if self.on_finish is not None:
                self.on_finish(task)
        return finished

    def run_until_idle(self) -> list[Task]:
        """Run every queued task; return them in the order they finished."""
        finished: list[Task] = []
        while self.scheduler.has_unfinished():
            finished.extend(self.step())
        return finished

    def _run(self, task: Task) -> TaskOutcome:
        try:
            self.generator.generate(task, self.on_step)
        except TaskCancelled:
            return TaskOutcome(task.id, cancelled=True)
        except Exception as exc:  # the task fails, the engine goes on
            LOG.error("task %s failed:\n%s", task.id, traceback.format_exc())
            return TaskOutcome(task.id, error=f"{type(exc).__name__}: {exc}")
        return TaskOutcome(task.id)
