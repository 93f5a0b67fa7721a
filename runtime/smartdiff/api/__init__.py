"""Torch-free API types shared by the CLI, the runtime and the operator.

Pydantic models for the ``VideoGeneration`` resource (spec and status), the
per-request user parameters and the topology planner. This package imports
neither torch nor kopf (checked by import-linter).
"""
