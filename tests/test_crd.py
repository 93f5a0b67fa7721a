"""The generated CRD: committed file up to date, structural schema, CEL rules, columns.

The API-server-backed checks (apply the CRD, create good and bad objects) live with
the control-plane tests; here the schema is checked offline, including a small
OpenAPI walker that validates the example manifest against it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from smartdiff.api import crd
from smartdiff.api.params import SOLVERS, UserParams
from smartdiff.api.spec import ATTENTION_BACKENDS
from smartdiff.api.status import PHASES

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / crd.CRD_PATH
ALLOWED_KEYS = {
    "description",
    "type",
    "format",
    "default",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "items",
    "properties",
    "additionalProperties",
    "required",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
}


@pytest.fixture(scope="module")
def definition() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(crd.render())
    return loaded


@pytest.fixture(scope="module")
def schema(definition: dict[str, Any]) -> dict[str, Any]:
    version = definition["spec"]["versions"][0]
    root: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return root


def test_committed_crd_is_generated() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == crd.render(), (
        f"run: python -m smartdiff.api.crd --write {crd.CRD_PATH}"
    )
    assert crd.main(["--check", str(COMMITTED)]) == 0


def test_check_reports_a_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "crd.yaml"
    stale.write_text(crd.render().replace("shortNames:\n    - vg", "shortNames:\n    - vgx"))
    assert crd.main(["--check", str(stale)]) == 1
    captured = capsys.readouterr()
    assert "-    - vgx" in captured.out and "+    - vg" in captured.out
    assert "out of date" in captured.err
    assert crd.main(["--check", str(tmp_path / "missing.yaml")]) == 1


def test_names_scope_and_version(definition: dict[str, Any]) -> None:
    assert definition["apiVersion"] == "apiextensions.k8s.io/v1"
    assert definition["metadata"]["name"] == "videogenerations.smartdiff.io"
    spec = definition["spec"]
    assert spec["group"] == "smartdiff.io" and spec["scope"] == "Namespaced"
    names = spec["names"]
    assert (names["kind"], names["plural"], names["singular"], names["shortNames"]) == (
        "VideoGeneration",
        "videogenerations",
        "videogeneration",
        ["vg"],
    )
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def _walk(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, child in node.get("properties", {}).items():
        found += _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    nodes = _walk(schema, "")
    assert len(nodes) > 80
    for path, node in nodes:
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert set(node) <= ALLOWED_KEYS, (path, set(node) - ALLOWED_KEYS)
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("type") == "array":
            assert isinstance(node.get("items"), dict), path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        for name in node.get("required", []):
            assert name in node["properties"], (path, name)
        if "default" in node:
            assert node["default"] is not None, path
        # The API server reads bounds as float64 and requires integral ones for integers.
        for bound in ("minimum", "maximum"):
            if bound in node:
                assert abs(node[bound]) <= 2**53, (path, bound)
    # Metadata is plain `type: object`; nothing preserves unknown fields.
    assert schema["properties"]["metadata"] == {"type": "object"}
    assert not any(node.get("x-kubernetes-preserve-unknown-fields") for _, node in nodes)
    assert schema["required"] == ["spec"]


def test_schema_carries_bounds_enums_and_defaults(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    video = spec["video"]["properties"]
    sampling = spec["sampling"]["properties"]
    defaults = UserParams(prompt="x")
    assert video["width"]["default"] == defaults.width
    assert video["height"]["default"] == defaults.height
    assert video["frames"]["default"] == defaults.frames
    assert video["fps"]["default"] == defaults.fps
    assert sampling["steps"]["default"] == defaults.steps
    assert sampling["guidanceScale"]["default"] == defaults.guidance_scale
    assert sampling["shift"]["default"] == defaults.shift
    assert sampling["solver"]["default"] == defaults.solver
    assert sampling["solver"]["enum"] == list(SOLVERS)
    assert spec["model"]["properties"]["name"]["default"] == defaults.model
    assert (video["frames"]["minimum"], video["frames"]["maximum"]) == (1, 1025)
    assert (video["width"]["minimum"], video["width"]["maximum"]) == (16, 4096)
    assert sampling["shift"]["minimum"] == 0 and sampling["shift"]["exclusiveMinimum"] is True
    assert spec["acceleration"]["properties"]["attention"]["enum"] == list(ATTENTION_BACKENDS)
    assert spec["resources"]["properties"]["gpus"]["minimum"] == 1
    assert spec["resources"]["properties"]["gpuResourceName"]["default"] == "nvidia.com/gpu"
    assert spec["backoffLimit"]["default"] == 0
    assert spec["activeDeadlineSeconds"]["minimum"] == 1
    assert spec["ttlSecondsAfterFinished"]["minimum"] == 0
    assert "nullable" not in str(schema)
    for optional_object in ("model", "video", "sampling", "acceleration", "resources"):
        assert spec[optional_object]["default"] == {}
    assert schema["properties"]["spec"]["required"] == ["prompt", "output"]
    status = schema["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == list(PHASES)
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert conditions["items"]["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert status["startTime"]["format"] == "date-time"


def _rules(node: dict[str, Any]) -> dict[str, str]:
    return {rule["rule"]: rule["message"] for rule in node.get("x-kubernetes-validations", [])}


def test_cel_rules(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    rules = _rules(spec)
    assert rules["self == oldSelf"] == "spec is immutable"
    product = next(rule for rule in rules if "resources.gpus" in rule and "ulysses" in rule)
    assert "self.parallelism.mode != 'explicit'" in product
    assert any("guidanceScale" in rule and "cfg" in rule for rule in rules)
    video = spec["properties"]["video"]["properties"]
    assert _rules(video["frames"]) == {
        "self % 4 == 1": "frames must be 4n+1 (1, 5, 9, ..., 81, ...)"
    }
    assert "self % 16 == 0" in _rules(video["width"])
    assert "self % 16 == 0" in _rules(video["height"])
    properties = spec["properties"]
    assert any("gpusPerNode" in rule for rule in _rules(properties["resources"]))
    assert any("explicit" in rule for rule in _rules(properties["parallelism"]))
    cache = properties["acceleration"]["properties"]["cache"]
    assert any("threshold" in rule for rule in _rules(cache))
    assert len(_rules(properties["resources"]["properties"]["tolerations"]["items"])) == 3
    # Every rule is a non-empty expression with a message; fieldPaths name real fields.
    for path, node in _walk(schema, ""):
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["rule"].strip() and rule["message"].strip(), path
            if "fieldPath" in rule:
                target = node
                for part in rule["fieldPath"].lstrip(".").split("."):
                    target = target["properties"][part]


def test_printer_columns(definition: dict[str, Any], schema: dict[str, Any]) -> None:
    columns = definition["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in columns] == [
        "Phase",
        "Progress",
        "GPUs",
        "Topology",
        "Age",
        "Output",
    ]
    age = columns[4]
    assert (age["type"], age["jsonPath"]) == ("date", ".metadata.creationTimestamp")
    for column in columns:
        if column["jsonPath"].startswith(".metadata"):
            continue
        node = schema
        for part in column["jsonPath"].lstrip(".").split("."):
            node = node["properties"][part]
        expected = {"string": "string", "integer": "integer"}[node["type"]]
        assert column["type"] == expected, column


# --- a small OpenAPI v3 validator (types, bounds, patterns, unknown fields) ---


def _validate(value: Any, node: dict[str, Any], path: str) -> list[str]:
    kind = node["type"]
    python_types: dict[str, tuple[type, ...]] = {
        "object": (dict,),
        "array": (list,),
        "string": (str,),
        "integer": (int,),
        "number": (int, float),
        "boolean": (bool,),
    }
    if not isinstance(value, python_types[kind]) or (
        kind in ("integer", "number") and isinstance(value, bool)
    ):
        return [f"{path}: expected {kind}"]
    problems: list[str] = []
    if "enum" in node and value not in node["enum"]:
        problems.append(f"{path}: not in enum")
    if "minimum" in node and (
        value <= node["minimum"] if node.get("exclusiveMinimum") else value < node["minimum"]
    ):
        problems.append(f"{path}: below minimum")
    if "maximum" in node and value > node["maximum"]:
        problems.append(f"{path}: above maximum")
    if kind == "string":
        if len(value) > node.get("maxLength", len(value)) or len(value) < node.get("minLength", 0):
            problems.append(f"{path}: length")
        if "pattern" in node and re.search(node["pattern"], value) is None:
            problems.append(f"{path}: pattern")
    if kind == "object":
        properties = node.get("properties")
        for name in node.get("required", []):
            if name not in value:
                problems.append(f"{path}.{name}: required")
        for name, child in value.items():
            if properties is not None:
                if name not in properties:
                    problems.append(f"{path}.{name}: unknown field (would be pruned)")
                else:
                    problems += _validate(child, properties[name], f"{path}.{name}")
            elif isinstance(node.get("additionalProperties"), dict):
                problems += _validate(child, node["additionalProperties"], f"{path}.{name}")
    if kind == "array":
        for index, item in enumerate(value):
            problems += _validate(item, node["items"], f"{path}[{index}]")
    return problems


def test_example_manifest_is_valid_against_the_crd(schema: dict[str, Any]) -> None:
    manifest = yaml.safe_load((REPO / "examples" / "video.yaml").read_text())
    assert _validate(manifest, schema, "") == []


@pytest.mark.parametrize(
    ("patch", "problem"),
    [
        ({"video": {"frames": 2000}}, ".spec.video.frames: above maximum"),
        ({"video": {"width": "832"}}, ".spec.video.width: expected integer"),
        ({"sampling": {"solver": "ddim"}}, ".spec.sampling.solver: not in enum"),
        ({"sampling": {"shift": 0}}, ".spec.sampling.shift: below minimum"),
        ({"model": {"weights": "http://x"}}, ".spec.model.weights: pattern"),
        ({"output": {"uri": "gs://b/k"}}, ".spec.output.uri: pattern"),
        ({"activeDeadlineSeconds": 0}, ".spec.activeDeadlineSeconds: below minimum"),
        ({"prompt": " \n "}, ".spec.prompt: pattern"),
        ({"gpus": 2}, ".spec.gpus: unknown field (would be pruned)"),
    ],
)
def test_schema_rejects_what_the_models_reject(
    schema: dict[str, Any], patch: dict[str, Any], problem: str
) -> None:
    manifest = yaml.safe_load((REPO / "examples" / "video.yaml").read_text())
    for key, value in patch.items():
        if isinstance(value, dict):
            manifest["spec"].setdefault(key, {}).update(value)
        else:
            manifest["spec"][key] = value
    assert problem in _validate(manifest, schema, "")


def test_module_runs_as_a_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert crd.main([]) == 0
    assert capsys.readouterr().out == crd.render()
