"""Fixtures for the KubeRay manifest tests: the committed manifests, and validators built from KubeRay's own CRDs.

The CRDs' ``openAPIV3Schema`` is OpenAPI v3 with Kubernetes extensions, not plain JSON Schema. They are translated
to what the API server (with kubectl's default strict field validation) would enforce on create:

- ``x-kubernetes-int-or-string: true`` -> ``anyOf: [integer, string]``; ``nullable: true`` -> ``null`` allowed;
- an object with ``properties`` and no ``additionalProperties`` rejects unknown fields (kubectl --validate=strict);
- ``x-kubernetes-list-type: map`` -> items unique by their ``x-kubernetes-list-map-keys`` (a missing key takes
  its schema default, else is an error); ``set`` -> unique items;
- ``format: int32/int64`` -> range checks;
- ``x-kubernetes-validations`` (CEL): transition rules (those reading ``oldSelf``) only run on update and are
  skipped; any other rule cannot be evaluated offline, so a manifest that sets such a field fails with a message
  saying so rather than passing unchecked.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML: libyaml reads them in ~0.6 s

_SUBSCHEMA_MAPS = ("properties",)
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not")
_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf")


def openapi_to_jsonschema(node: dict) -> dict:
    """One CRD schema node (OpenAPI v3 + x-kubernetes-*) as JSON Schema 2020-12 plus the two custom keywords."""
    out = dict(node)
    for key in _SUBSCHEMA_MAPS:
        if key in out:
            out[key] = {name: openapi_to_jsonschema(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = openapi_to_jsonschema(out[key])
    for key in _SUBSCHEMA_LISTS:
        if key in out:
            out[key] = [openapi_to_jsonschema(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict) -> Iterator[jsonschema.ValidationError]:
    if not isinstance(instance, list):
        return
    if list_type == "set":
        seen: list[Any] = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate entry {item!r} in a list of type set")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        item_props = schema.get("items", {}).get("properties", {})
        first: dict[str, int] = {}
        for index, item in enumerate(instance):
            if not isinstance(item, dict):
                continue
            missing = [k for k in keys if k not in item and "default" not in item_props.get(k, {})]
            if missing:
                yield jsonschema.ValidationError(f"item {index} lacks the list-map key(s) {missing}")
                continue
            key = {k: item.get(k, item_props.get(k, {}).get("default")) for k in keys}
            ident = json.dumps(key, sort_keys=True)
            if ident in first:
                yield jsonschema.ValidationError(f"items {first[ident]} and {index} share the list-map key {key}")
            first.setdefault(ident, index)


def _cel_rules(validator: Any, rules: list[dict], instance: Any, schema: dict) -> Iterator[jsonschema.ValidationError]:
    for rule in rules:
        if "oldSelf" in rule["rule"]:
            continue  # a transition rule: the API server runs it on update only
        yield jsonschema.ValidationError(
            f"CEL rule {rule['rule']!r} ({rule.get('message', '')}) cannot be checked offline; "
            "a manifest setting this field needs a check of its own"
        )


FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules},
)


def make_validator(openapi_schema: dict) -> Callable[[Any], list[str]]:
    validator = KubeValidator(openapi_to_jsonschema(openapi_schema), format_checker=FORMATS)

    def errors(instance: Any) -> list[str]:
        return sorted(f"{e.json_path}: {e.message}" for e in validator.iter_errors(instance))

    return errors


def subschema(schema: dict, path: str) -> dict:
    """Walk an OpenAPI schema by a dotted path; ``[]`` steps into array items."""
    node = schema
    for part in path.split("."):
        many = part.endswith("[]")
        node = node["properties"][part.removesuffix("[]")]
        if many:
            node = node["items"]
    return node


@pytest.fixture(scope="session")
def crd_schemas() -> dict[str, dict]:
    """kind -> the raw ``v1`` openAPIV3Schema of KubeRay's CRD for it."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR} (the shared/ folder beside the repository)")
    schemas = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((CRD_DIR / name).read_text(), Loader=Loader)
        assert crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[kind] = version["schema"]["openAPIV3Schema"]
    return schemas


@pytest.fixture(scope="session")
def crd_validators(crd_schemas: dict[str, dict]) -> dict[str, Callable[[Any], list[str]]]:
    """kind -> a function returning the validation errors of a document (empty when valid).

    Besides the three KubeRay kinds: ``Service`` (core/v1, from the schema RayService embeds for ``serveService``),
    ``PersistentVolumeClaimSpec`` (from pod volumes' ``ephemeral.volumeClaimTemplate``) and ``ObjectMeta`` (the
    embedded metadata schema: name, namespace, labels, annotations).
    """
    service = subschema(crd_schemas["RayService"], "spec.serveService")
    claim_spec = subschema(
        crd_schemas["RayCluster"], "spec.headGroupSpec.template.spec.volumes[].ephemeral.volumeClaimTemplate.spec"
    )
    validators = {kind: make_validator(schema) for kind, schema in crd_schemas.items()}
    validators["Service"] = make_validator(service)
    validators["PersistentVolumeClaimSpec"] = make_validator(claim_spec)
    validators["ObjectMeta"] = make_validator(service["properties"]["metadata"])
    return validators


def load_cluster_file(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc is not None]


@pytest.fixture(scope="session")
def values() -> dict:
    return yaml.safe_load((CLUSTER / "values.yaml").read_text())


@pytest.fixture(scope="session")
def committed() -> dict[str, list[dict]]:
    """Every generated manifest file in cluster/ (all *.yaml but values.yaml), parsed."""
    return {p.name: load_cluster_file(p.name) for p in sorted(CLUSTER.glob("*.yaml")) if p.name != "values.yaml"}


@pytest.fixture(scope="session")
def by_kind(committed: dict[str, list[dict]]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for docs in committed.values():
        for doc in docs:
            kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


@pytest.fixture
def raycluster_doc(by_kind: dict[str, list[dict]]) -> dict:
    """A private copy of the committed RayCluster, for tests that break it on purpose."""
    return copy.deepcopy(by_kind["RayCluster"][0])
