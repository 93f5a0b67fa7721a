"""The base model of the ``VideoGeneration`` resource types.

Role: the one pydantic configuration every spec and status model shares -- camelCase
JSON names (``negativePrompt``) with snake_case Python attributes
(``negative_prompt``), both accepted on input; frozen; unknown fields rejected;
strict types (a manifest's ``frames: "81"`` is an error, as it is for the API
server); attribute docstrings become the field descriptions that ``crd`` copies
into the OpenAPI schema (and ``kubectl explain`` shows). ``describe_errors`` turns
a pydantic ``ValidationError`` into one line per problem, each naming the camelCase
field path, the offending value and what is allowed.
Talks to: ``videogeneration`` and ``status`` (subclasses), ``crd`` (reads schemas).
"""

from __future__ import annotations

import re
import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """A frozen, strict, camelCase pydantic model (one object of the resource)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        frozen=True,
        extra="forbid",
        strict=True,
        use_attribute_docstrings=True,
    )

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready camelCase dict without unset optional fields (for the API server)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def json_name(info: ValidationInfo) -> str:
    """The camelCase (JSON) name of the field a validator is checking."""
    return to_camel(info.field_name) if info.field_name else "value"


def describe_errors(error: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    """One line per problem: ``spec.video.frames: frames=80 is not allowed: ...``.

    ``root`` (the validated model) lets an unknown-field error list the known fields.
    """
    lines = []
    for entry in error.errors(include_url=False):
        loc = entry["loc"]
        path = _path(loc) or "(top level)"
        leaf = str(loc[-1]) if loc else "value"
        kind, message, value = entry["type"], entry["msg"], entry.get("input")
        if kind == "value_not_allowed":
            lines.append(f"{_checked_path(path, leaf, message)}: {message}")
        elif kind == "missing":
            lines.append(f"{path}: required field is missing")
        elif kind == "extra_forbidden":
            known = _known_fields(root, loc[:-1]) if root is not None else []
            allowed = f"; known fields: {', '.join(known)}" if known else ""
            lines.append(f"{path}: unknown field{allowed}")
        else:
            message = message[:1].lower() + message[1:]
            label = path.rsplit(".", 1)[-1]
            lines.append(f"{path}: {label}={value!r:.80} is not allowed: {message}")
    return lines


def _checked_path(path: str, leaf: str, message: str) -> str:
    """Extend ``path`` by the field a model-level check names (``parallelism.cfg=2 ...``).

    A field check names its own field (the last part of ``path``); a check on a
    whole object names the field inside it that is wrong.
    """
    named = re.match(r"[A-Za-z0-9_.\[\]-]+(?==)", message)
    if named is None:
        return path
    name = named.group(0)
    head = re.match(r"[A-Za-z0-9_]+", name)
    if head is not None and head.group(0) == leaf:
        return path + name[len(head.group(0)) :]
    return f"{path}.{name}" if path != "(top level)" else name


def _path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _known_fields(root: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The JSON names of the fields of the model at ``loc`` below ``root``."""
    current: Any = root
    for part in loc:
        current = _unwrap(current, index=isinstance(part, int))
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        fields = current.model_fields
        match = [f for name, f in fields.items() if part in (name, f.alias)]
        if not match:
            return []
        current = match[0].annotation
    current = _unwrap(current, index=False)
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return []
    return [field.alias or name for name, field in current.model_fields.items()]


def _unwrap(annotation: Any, *, index: bool) -> Any:
    """``X | None`` -> ``X``; with ``index``, ``list[X]`` -> ``X``."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
        origin = get_origin(annotation)
    if index and origin is list:
        return get_args(annotation)[0]
    return annotation
