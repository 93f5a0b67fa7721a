"""The engine: tasks, task pool, scheduler, generator, backend and the Engine facade.

A request (``UserParams``) becomes a ``Task`` (``task``) held by the ``TaskPool`` (``pool``);
the ``Scheduler`` (``scheduler``, torch-free) picks what runs; the ``Generator``
(``generator``) encodes, denoises and decodes it on the models owned by the ``Backend``
(``backend``); ``Engine`` (``engine``) wires them together; ``request.check_request`` rejects a
request that does not fit the model before anything loads.

This package imports nothing itself: import from the submodules
(``from smartdiff.engine.engine import Engine``), so the torch-free ones stay torch-free.
"""
