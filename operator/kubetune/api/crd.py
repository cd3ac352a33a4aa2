"""Generate the CustomResourceDefinitions (FineTuneJob, FineTuneSweep) from the pydantic
models.

The output is a *structural* schema (what the API server requires): references inlined,
no ``anyOf`` with typed branches, no ``title``, no ``additionalProperties: false`` and no
defaults (the operator and trainer apply those).

``Optional`` fields of the spec are *not* ``nullable``: the API server then prunes an explicit
``null`` as if the field were absent, which is what the models do (``_Spec._nulls_are_unset``),
so CEL rules never see a null and ``kubetune validate`` agrees with the cluster. The status,
written only by the operator, keeps ``nullable``.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from kubetune.api import v1alpha1 as api

# JSON-Schema keys pydantic emits that a structural CRD schema must not carry.
_DROP = {"title", "default", "examples", "$defs", "discriminator", "uniqueItems"}


def _structural(node: Any, defs: dict[str, Any], nullable: bool = True) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs, nullable) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        ref = node.pop("$ref").rsplit("/", 1)[-1]
        target = copy.deepcopy(defs[ref])
        rules = target.get("x-kubernetes-validations", []) + node.get(
            "x-kubernetes-validations", [])  # the model's rules and the field's, both
        node = {**target, **node}
        if rules:
            node["x-kubernetes-validations"] = rules
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot make a structural schema from anyOf {branches}")
        node = {**branches[0], **node}
        if nullable:
            node["nullable"] = True
        if "$ref" in node:
            return _structural(node, defs, nullable)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(node.get(bound), int | float) and not isinstance(node[bound], bool):
            node["minimum" if bound == "exclusiveMinimum" else "maximum"] = node[bound]
            node[bound] = True
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    if node.get("type") == "object" and node.get("additionalProperties") in (True, {}):
        # A free-form map (tolerations, affinity): keep what the user wrote.
        del node["additionalProperties"]
        node["x-kubernetes-preserve-unknown-fields"] = True
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs, nullable) for k, v in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _structural(value, defs, nullable)
        else:
            out[key] = value
    return out


def openapi_schema(model: type[api.BaseModel], nullable: bool = True) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}), nullable)


def status_schema(model: type[api.BaseModel] = api.FineTuneJobStatus) -> dict[str, Any]:
    schema = openapi_schema(model)
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return schema


def _crd(kind: str, plural: str, short_names: list[str], columns: list[dict[str, Any]],
         description: str, rules: list[Any], spec: type[api.BaseModel],
         status: type[api.BaseModel]) -> dict[str, Any]:
    """A namespaced kind of the group and version, with a status subresource."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["kubetune"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        *columns,
                        {"name": "Age", "type": "date",
                         "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "x-kubernetes-validations": [
                                {"rule": r.cel, "message": r.message} for r in rules],
                            "properties": {
                                "apiVersion": {"type": "string", "description": (
                                    f"{api.API_VERSION}.")},
                                "kind": {"type": "string", "description": f"{kind}."},
                                # An API server refuses anything but a type here.
                                "metadata": {"type": "object"},
                                "spec": openapi_schema(spec, nullable=False),
                                "status": status_schema(status),
                            },
                        }
                    },
                }
            ],
        },
    }


def finetunejob_crd() -> dict[str, Any]:
    return _crd(api.KIND, api.PLURAL, api.SHORT_NAMES, [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Step", "type": "string", "jsonPath": ".status.progress.steps"},
        {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
        {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
        {"name": "Stage", "type": "string", "jsonPath": ".spec.stage", "priority": 1},
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "priority": 1},
    ], "FineTuneJob fine-tunes a language model.", api.ALL_RULES["metadata"],
        api.FineTuneJobSpec, api.FineTuneJobStatus)


def finetunesweep_crd() -> dict[str, Any]:
    """The FineTuneSweep CRD: the same group and version, its template a FineTuneJob spec
    (with the same schema and rules)."""
    return _crd(api.SWEEP_KIND, api.SWEEP_PLURAL, api.SWEEP_SHORT_NAMES, [
        {"name": "Done", "type": "string", "jsonPath": ".status.done"},
        {"name": "Best", "type": "number", "jsonPath": ".status.best.value"},
        {"name": "Trial", "type": "string", "jsonPath": ".status.best.name"},
        {"name": "Metric", "type": "string", "jsonPath": ".spec.objective.metric",
         "priority": 1},
    ], "FineTuneSweep searches FineTuneJob settings: trials made from a template, the best "
       "by an objective.", api.SWEEP_RULES["metadata"], api.FineTuneSweepSpec,
        api.FineTuneSweepStatus)


# Each CRD by kind: the function that builds it and the file `make crds` writes it to.
CRDS = {
    api.KIND: (finetunejob_crd, "kubetune.io_finetunejobs.yaml"),
    api.SWEEP_KIND: (finetunesweep_crd, "kubetune.io_finetunesweeps.yaml"),
}


def render_yaml(kind: str = api.KIND) -> str:
    header = "# Generated from operator/kubetune/api/v1alpha1.py by `make crds`. Do not edit.\n"
    return header + yaml.safe_dump(CRDS[kind][0](), sort_keys=False, width=100)
