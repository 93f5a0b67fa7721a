#!/usr/bin/env python3
"""Generate ``docs/crd-reference.md`` from the VideoGeneration CRD's OpenAPI schema.

Role: the user-facing reference of every field of ``smartdiff.io/v1alpha1``
``VideoGeneration`` -- type, default, bounds, enums, patterns, CEL rules and the
description -- rendered from the committed CRD (``crds/``, itself generated from the
pydantic models), so the reference can never drift from what the API server enforces.
``tests/test_examples.py`` checks the committed file is current.

Usage::

    python hack/gen-crd-docs.py            # print the Markdown
    python hack/gen-crd-docs.py --write    # write docs/crd-reference.md
    python hack/gen-crd-docs.py --check    # exit 1 with a diff if it is stale

Talks to: the CRD YAML file (reads it); nothing else. Needs only PyYAML.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "smartdiff.io_videogenerations.yaml"
DOC_FILE = REPO / "docs" / "crd-reference.md"


@dataclass(frozen=True)
class Field:
    """One documented field: its dotted path and its schema node."""

    path: str
    schema: dict[str, Any]
    required: bool


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def code(text: str) -> str:
    return f"`{cell(text)}`"


def walk(schema: dict[str, Any], path: str, required: bool) -> Iterator[Field]:
    """Every field below ``schema`` (depth first, in schema order), itself first."""
    yield Field(path, schema, required)
    needed = set(schema.get("required", []))
    for name, child in (schema.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}", name in needed)
    items = schema.get("items")
    if isinstance(items, dict) and (items.get("properties") or items.get("type") == "object"):
        yield from walk(items, f"{path}[]", False)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and extra.get("properties"):
        yield from walk(extra, f"{path}.<key>", False)


def type_of(schema: dict[str, Any]) -> str:
    kind = str(schema.get("type", "any"))
    if kind == "array":
        return f"[]{type_of(schema.get('items') or {})}"
    extra = schema.get("additionalProperties")
    if kind == "object" and isinstance(extra, dict) and not schema.get("properties"):
        return f"map[string]{type_of(extra)}"
    return kind


def constraints(field: Field) -> list[str]:
    """The validation rules of one field, as short phrases."""
    schema = field.schema
    out: list[str] = []
    if field.required:
        out.append("required")
    if "enum" in schema:
        out.append("one of " + ", ".join(code(str(v)) for v in schema["enum"]))
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None:
        out.append(f"{'>' if schema.get('exclusiveMinimum') else '>='} {low}")
    if high is not None:
        out.append(f"{'<' if schema.get('exclusiveMaximum') else '<='} {high}")
    for key, word in (
        ("minLength", "length >="),
        ("maxLength", "length <="),
        ("minItems", "items >="),
        ("maxItems", "items <="),
        ("maxProperties", "entries <="),
    ):
        if key in schema:
            out.append(f"{word} {schema[key]}")
    if "pattern" in schema:
        out.append(f"pattern {code(schema['pattern'])}")
    for rule in schema.get("x-kubernetes-validations", []):
        out.append(f"CEL {code(rule['rule'])}: {cell(rule.get('message', ''))}")
    return out


def default_of(schema: dict[str, Any]) -> str:
    if "default" not in schema:
        return ""
    value = schema["default"]
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return code(text if value != "" else '""')


def field_table(root: dict[str, Any], prefix: str) -> list[str]:
    lines = [
        "| Field | Type | Default | Validation | Description |",
        "|---|---|---|---|---|",
    ]
    fields = list(walk(root, prefix, False))[1:]
    for field in fields:
        lines.append(
            "| "
            + " | ".join(
                [
                    code(field.path),
                    code(type_of(field.schema)),
                    default_of(field.schema),
                    "; ".join(constraints(field)),
                    cell(str(field.schema.get("description", ""))),
                ]
            )
            + " |"
        )
    return lines


def render(crd: dict[str, Any]) -> str:
    spec = crd["spec"]
    names = spec["names"]
    (version,) = [v for v in spec["versions"] if v.get("storage")]
    schema = version["schema"]["openAPIV3Schema"]
    kind_spec = schema["properties"]["spec"]
    kind_status = schema["properties"]["status"]
    api = f"{spec['group']}/{version['name']}"
    lines = [
        f"# {names['kind']} reference ({api})",
        "",
        "<!-- Generated by `python hack/gen-crd-docs.py --write` from "
        "crds/smartdiff.io_videogenerations.yaml; do not edit. -->",
        "",
        cell(str(schema.get("description", ""))),
        "",
        "| | |",
        "|---|---|",
        f"| API version | {code(api)} |",
        f"| Kind | {code(names['kind'])} (list: {code(names['listKind'])}) |",
        f"| Plural / singular | {code(names['plural'])} / {code(names['singular'])} |",
        f"| Short names | {', '.join(code(n) for n in names.get('shortNames', []))} |",
        f"| Scope | {spec['scope']} |",
        f"| Subresources | {', '.join(code(s) for s in version.get('subresources', {}))} |",
        "",
        "## Columns of `kubectl get`",
        "",
        "| Column | Type | From | Description |",
        "|---|---|---|---|",
    ]
    for column in version.get("additionalPrinterColumns", []):
        lines.append(
            f"| {column['name']} | {column['type']} | {code(column['jsonPath'])} | "
            f"{cell(column.get('description', ''))} |"
        )
    lines += [
        "",
        "## spec",
        "",
        cell(str(kind_spec.get("description", ""))),
        "",
        "Rules on the whole spec, checked by the API server before anything runs:",
        "",
    ]
    for rule in kind_spec.get("x-kubernetes-validations", []):
        lines.append(f"- {cell(rule.get('message', ''))}: {code(rule['rule'])}")
    lines += ["", *field_table(kind_spec, "spec"), "", "## status", ""]
    lines += [
        cell(str(kind_status.get("description", "")))
        + " Written by the operator and the runtime pods through the status subresource.",
        "",
        *field_table(kind_status, "status"),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"write {DOC_FILE.relative_to(REPO)}")
    group.add_argument("--check", action="store_true", help="fail with a diff if it is stale")
    parser.add_argument("--crd", type=Path, default=CRD_FILE, help="the CRD YAML to document")
    args = parser.parse_args(argv)
    text = render(yaml.safe_load(args.crd.read_text()))
    if args.write:
        DOC_FILE.parent.mkdir(parents=True, exist_ok=True)
        DOC_FILE.write_text(text)
        return 0
    if args.check:
        current = DOC_FILE.read_text() if DOC_FILE.exists() else ""
        if current == text:
            return 0
        diff = difflib.unified_diff(
            current.splitlines(True), text.splitlines(True), str(DOC_FILE), "generated"
        )
        sys.stderr.writelines(diff)
        sys.stderr.write(
            "\ndocs/crd-reference.md is stale: run python hack/gen-crd-docs.py --write\n"
        )
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
