"""Torch-free API types shared by the CLI, the runtime and the operator.

Pydantic models for the ``VideoGeneration`` resource (``videogeneration``: the
resource and its spec; ``spec``: the spec's parts; ``status``), the per-request
and per-process parameters (``params``), the topology planner (``topology``), the
shared limits and messages (``checks``) and the CRD generator (``crd``). This
package imports neither torch nor kopf (checked by import-linter).
"""
