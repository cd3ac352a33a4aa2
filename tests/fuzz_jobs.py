"""Fuzzing FineTuneJob files: mutated documents and bytes, and the verdicts to compare.

Three layers, each used by tests/test_fuzz_jobs.py (and runnable on any checkout, which is how
the before/after table of the hardening issue was measured):

- ``loader``: hostile bytes (not UTF-8, deep nesting, alias bombs, huge files) through
  ``kubetune.jobfile.load_job``: a message or a job, fast, never another exception;
- ``parity``: documents mutated from a valid job, judged by the models (``parse_job``) and by
  the CRD as the API server applies it (``server_verdict``: null pruning, the structural schema,
  list-map keys, the CEL rules): the same verdict;
- ``render``: every job both accept rendered into its children, each checked as a real API
  server (and the pods' kubelet) would check it (``render_problems``).
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jsonschema
from hypothesis import strategies as st

BASE_SPEC: dict[str, Any] = {
    "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct", "secretRef": {"name": "hf-token"}},
    "datasets": [
        {"source": "pvc://data/identity.json", "format": "alpaca",
         "placeholders": {"name": "Kubetune"}},
        {"source": "pvc://data/dataset_info.json", "entries": ["alpaca_en_demo"]},
    ],
    "stage": "sft",
    "method": {"type": "lora", "lora": {"rank": 8, "alpha": 16,
                                        "targetModules": ["q_proj", "v_proj"]}},
    "template": "auto",
    "training": {"epochs": 2.0, "learningRate": 0.0001, "batchSizePerDevice": 2,
                 "cutoffLen": 1024, "seed": 7, "evalSplit": 0.1, "evalSteps": 20},
    "resources": {"nodes": 1, "gpusPerNode": 1, "memory": "16Gi", "cpu": "4"},
    "output": {"uri": "pvc://outputs/run-1", "merge": True},
    "scheduling": {"nodeSelector": {"gpu": "a100"},
                   "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                    "effect": "NoSchedule"}],
                   "priorityClassName": "training"},
    "runPolicy": {"backoffLimit": 2, "ttlSecondsAfterFinished": 600},
    "trainer": {"serviceAccountName": "trainer",
                "env": [{"name": "WANDB_MODE", "value": "offline"}]},
}


def base_job(name: str = "fuzz") -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "team-a"},
            "spec": copy.deepcopy(BASE_SPEC)}


# ------------------------------------------------------------------------ generation

_TEXTS = ["", "3", "yes", "true", "null", "a b", "a\u00a0b", "x\x01y", "tab\there", "nl\n",
          "ü", "pvc://Bad_Claim/x", "pvc://ok/x", "pvc://" + "a" * 300 + "/x", "hf://o/n",
          "https://u:p@host/d.json", "https://host/d.json?token=abc", "s3://b/k?X-Amz-Signature=1",
          "embedded://smollm2-135m-instruct", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD",
          "KUBEFLOW_TRAINER_SERVER_URL", "PET_NNODES", "MY_VAR", "9bad", "bad name",
          "chatml", "llama3", "alpaca", "sharegpt", "dpo", "kto", "cpo", "full", "freeze",
          "qlora", "Exists", "NoSchedule", "8Gi", "1.5", "100m", "-1", "a" * 64, "a" * 254,
          "UPPER", "trailing-", "x.y.z", "x/y"]
_NUMBERS = [0, 1, 2, -1, 3.5, 0.5, 1e-9, 7, 8, 64, 65, 1000, 1001, 10, 11, 4096, 131072, 131073,
            1048576, 1048577, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63,
            2**64, 10**30, -(2**63) - 1, 1e300, 1e400, float("inf"), float("-inf"),
            float("nan"), 3.0]


def _leaf(draw) -> Any:
    kind = draw(st.integers(0, 9))
    if kind <= 3:
        return draw(st.sampled_from(_TEXTS))
    if kind <= 6:
        return draw(st.sampled_from(_NUMBERS))
    if kind == 7:
        return draw(st.sampled_from([None, True, False, [], {}, ["x"], {"a": "b"}, [None],
                                     {"name": "x"}, [{"name": "A", "value": "1"}]]))
    if kind == 8:
        return draw(st.text(max_size=12))
    return draw(st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True)))


def _schema_leaf(draw, schema: dict, valid: bool = False) -> Any:
    """A value near what ``schema`` allows: its enum values and bounds (and, unless ``valid``,
    one step beyond them or any odd value)."""
    options: list[Any] = []
    options += schema.get("enum", [])
    step = 1 if schema.get("type") == "integer" else 0.5
    for bound in ("minimum", "maximum"):
        if bound in schema:
            b = schema[bound]
            options += [b] if valid else [b, b - step, b + step]
    if "minimum" in schema and "maximum" in schema and valid:
        options.append(schema["minimum"] + (schema["maximum"] - schema["minimum"]) // 2)
    if "maxLength" in schema and "pattern" not in schema:
        options += ["a" * schema["maxLength"]] + ([] if valid else
                                                  ["a" * (schema["maxLength"] + 1)])
    if schema.get("type") == "boolean":
        options += [True, False]
    if schema.get("type") == "string" and valid and not schema.get("enum"):
        options += [t for t in _TEXTS if len(t) <= schema.get("maxLength", 10**6)]
    if schema.get("type") == "array" and "items" in schema:
        options.append([_schema_leaf(draw, schema["items"], valid)])
    if schema.get("type") == "object" and "properties" in schema:
        options.append({k: _schema_leaf(draw, v, valid) for k, v in schema["properties"].items()
                        if k in schema.get("required", [])})
    if options and (valid or draw(st.booleans())):
        return draw(st.sampled_from(options))
    return _leaf(draw)


def _sub_schema(schema: dict, path: list) -> dict | None:
    node: dict | None = schema
    for part in path:
        if node is None:
            return None
        if isinstance(part, int):
            node = node.get("items")
        else:
            node = node.get("properties", {}).get(part) or node.get("additionalProperties")
            if not isinstance(node, dict):
                return None
    return node


def _containers(doc: Any, path: list | None = None):
    """Every (path, dict-or-list) in doc."""
    path = path or []
    if isinstance(doc, dict | list):
        yield path, doc
        items = doc.items() if isinstance(doc, dict) else enumerate(doc)
        for k, v in items:
            yield from _containers(v, [*path, k])


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


@st.composite
def mutated_jobs(draw, spec_schema: dict, valid: bool = False) -> dict[str, Any]:
    """A valid job with one to four mutations: a value replaced (by one near the schema's
    bounds, or any odd value), a field added from the schema, removed, renamed to snake_case,
    or an unknown one added. ``valid``: only values the schema's bounds allow, added or set,
    so that most jobs stay valid (for the render layer)."""
    doc = base_job()
    for _ in range(draw(st.integers(1, 4))):
        places = [(p, c) for p, c in _containers(doc["spec"])]
        path, node = draw(st.sampled_from(places))
        schema = _sub_schema(spec_schema, path) or {}
        op = draw(st.sampled_from(["set", "add"] if valid else
                                  ["set", "set", "add", "add", "drop", "snake", "unknown"]))
        if isinstance(node, list):
            if node and op in ("set", "drop", "snake"):
                i = draw(st.integers(0, len(node) - 1))
                if op == "drop":
                    node.pop(i)
                else:
                    node[i] = _schema_leaf(draw, schema.get("items", {}), valid)
            else:
                node.append(_schema_leaf(draw, schema.get("items", {}), valid))
            continue
        props = schema.get("properties", {})
        if op == "add" and props:
            key = draw(st.sampled_from(sorted(props)))
            node[key] = _schema_leaf(draw, props[key], valid)
        elif (op == "unknown" or not node) and not valid:
            node[draw(st.sampled_from(["extra", "x", "secret_ref", "max_steps", "Stage"]))] = \
                _leaf(draw)
        elif node:
            key = draw(st.sampled_from(sorted(node, key=str)))
            if op == "drop":
                del node[key]
            elif op == "snake" and isinstance(key, str) and _snake(key) != key:
                node[_snake(key)] = node.pop(key)
            else:
                sub = props.get(key) or schema.get("additionalProperties") or {}
                node[key] = _schema_leaf(draw, sub if isinstance(sub, dict) else {}, valid)
    return doc


# ------------------------------------------------------------------------ the API server


def _int(checker, value):
    return isinstance(value, int) and not isinstance(value, bool)


def _number(checker, value):
    return isinstance(value, int | float) and not isinstance(value, bool)


def _strict_schema(schema: Any) -> Any:
    """The CRD schema for jsonschema: unknown fields refused (kubectl's strict field
    validation), RE2's `$` (end of text only) and integers that are ints."""
    if isinstance(schema, list):
        return [_strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_strict_schema(v) if k in ("items", "additionalProperties") else v)
           for k, v in schema.items() if k != "x-kubernetes-validations"}
    if "properties" in schema:
        out["properties"] = {k: _strict_schema(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if "pattern" in out:  # Python's `$` also matches before a final newline; RE2's does not
        out["pattern"] = re.sub(r"(?<!\\)\$", r"\\Z", out["pattern"])
    return out


class Server:
    """What a real API server does with a FineTuneJob's spec: prune nulls, validate the
    structural schema (strict fields), list-map keys, then the CEL rules."""

    def __init__(self, crd: dict[str, Any]):
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        self.spec_schema = root["properties"]["spec"]
        checker = jsonschema.Draft4Validator.TYPE_CHECKER.redefine_many(
            {"integer": _int, "number": _number})
        cls = jsonschema.validators.extend(jsonschema.Draft4Validator, type_checker=checker)
        self.validator = cls(_strict_schema(self.spec_schema))

    def verdict(self, spec: Any) -> str | None:
        """None when accepted, else why not."""
        try:  # what a client can send at all: JSON, finite numbers, int64
            text = json.dumps(spec, allow_nan=False)
        except (ValueError, TypeError) as err:
            return f"not JSON: {err}"
        spec = json.loads(text)
        if not isinstance(spec, dict):
            return "spec is not an object"
        if any(isinstance(v, int) and not -(2**63) <= v < 2**63 for v in _scalars(spec)):
            return "integer beyond int64"
        _prune_nulls(spec, self.spec_schema)
        errors = sorted(self.validator.iter_errors(spec), key=str)
        if errors:
            return f"schema: {errors[0].message[:200]}"
        problem = _list_map_keys(spec, self.spec_schema) or _cel(spec, self.spec_schema)
        return problem


def _scalars(node: Any):
    if isinstance(node, dict):
        for v in node.values():
            yield from _scalars(v)
    elif isinstance(node, list):
        for v in node:
            yield from _scalars(v)
    else:
        yield node


def _field_schema(schema: dict | None, key: str) -> dict | None:
    if schema is None:
        return None
    if key in schema.get("properties", {}):
        return schema["properties"][key]
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def _prune_nulls(node: Any, schema: dict | None) -> None:
    """k8s.io/apiextensions-apiserver defaulting.PruneNonNullableNullsWithoutDefaults."""
    if isinstance(node, dict):
        for key in list(node):
            sub = _field_schema(schema, key)
            if node[key] is None and sub is not None and not sub.get("nullable"):
                del node[key]
            else:
                _prune_nulls(node[key], sub)
    elif isinstance(node, list):
        for item in node:
            _prune_nulls(item, schema.get("items") if schema else None)


def _list_map_keys(node: Any, schema: dict) -> str | None:
    if isinstance(node, list):
        if schema.get("x-kubernetes-list-type") == "map":
            keys = [tuple(i.get(k) for k in schema["x-kubernetes-list-map-keys"]) for i in node]
            if len(keys) != len(set(keys)):
                return "duplicate list-map key"
        return next((p for i in node if (p := _list_map_keys(i, schema.get("items", {})))),
                    None)
    if isinstance(node, dict):
        for k, v in node.items():
            sub = _field_schema(schema, k)
            if sub and (p := _list_map_keys(v, sub)):
                return p
    return None


def _cel_value(node: Any, schema: dict | None) -> Any:
    """As CEL sees it on the API server: a `type: number` value is a double."""
    if isinstance(node, dict):
        return {k: _cel_value(v, _field_schema(schema, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_cel_value(v, schema.get("items") if schema else None) for v in node]
    if schema and schema.get("type") == "number" and isinstance(node, int):
        return float(node)
    return node


def _cel(node: Any, schema: dict | None) -> str | None:
    import cel

    if schema is None:
        return None
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            continue  # transition rules: not on create
        got = cel.evaluate(rule["rule"], {"self": _cel_value(node, schema)})
        if got is not True:
            return f"CEL: {rule['message']}"
    if isinstance(node, dict):
        for k, v in node.items():
            if p := _cel(v, _field_schema(schema, k)):
                return p
    elif isinstance(node, list):
        for v in node:
            if p := _cel(v, schema.get("items")):
                return p
    return None


# ------------------------------------------------------------------------ rendered objects

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*\Z")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?\Z")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]\Z")
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*\Z")
_CREDENTIAL_URL = re.compile(r"://[^/\s]*@|(?i:[?&](token|sig|signature|x-amz-signature)=)")
_SECRET_NAME = re.compile(r"(?i)(^|_)(TOKEN|SECRET|PASSWORD|API_KEY)(_|$)")


def _subdomain(v: str) -> bool:
    return len(v) <= 253 and _SUBDOMAIN.match(v) is not None


def _label_key(k: str) -> bool:
    prefix, _, name = k.rpartition("/")
    return (len(name) <= 63 and _LABEL_NAME.match(name) is not None
            and (not prefix or _subdomain(prefix)))


def _labels(labels: dict, where: str) -> list[str]:
    out = []
    for k, v in (labels or {}).items():
        if not _label_key(k):
            out.append(f"{where}: label key {k!r}")
        if not (isinstance(v, str) and len(v) <= 63 and _LABEL_VALUE.match(v)):
            out.append(f"{where}: label value {v!r}")
    return out


def pod_problems(spec: dict, where: str) -> list[str]:
    """What the API server refuses in a pod (validation.ValidatePodSpec), for the parts
    kubetune renders: names, env, volumes, node selector, tolerations."""
    out = []
    for c in spec["containers"]:
        for e in c.get("env", []):
            if not _ENV_NAME.match(e["name"]):
                out.append(f"{where}: env name {e['name']!r}")
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and not _subdomain(ref["name"]):
                out.append(f"{where}: Secret name {ref['name']!r}")
            if "value" in e and _SECRET_NAME.search(e["name"]) and not e["value"].startswith("/"):
                out.append(f"LEAK {where}: {e['name']} as a plain value")
            if "value" in e and "\x00" in e["value"]:
                out.append(f"{where}: NUL in env {e['name']}")
        names = [e["name"] for e in c.get("env", [])]
        if len(names) != len(set(names)):
            out.append(f"{where}: an env name twice: {names}")
    for v in spec.get("volumes", []):
        if not (len(v["name"]) <= 63 and re.fullmatch(_DNS_LABEL, v["name"])):
            out.append(f"{where}: volume name {v['name']!r}")
        claim = v.get("persistentVolumeClaim", {}).get("claimName")
        if claim is not None and not _subdomain(claim):
            out.append(f"{where}: claim name {claim!r}")
    for key in ("serviceAccountName", "priorityClassName"):
        if key in spec and not _subdomain(spec[key]):
            out.append(f"{where}: {key} {spec[key]!r}")
    out += _labels(spec.get("nodeSelector"), f"{where}.nodeSelector")
    for t in spec.get("tolerations", []):
        if t.get("operator") == "Exists" and t.get("value"):
            out.append(f"{where}: a toleration with operator Exists and a value")
        if t.get("key") and not _label_key(t["key"]):
            out.append(f"{where}: toleration key {t['key']!r}")
        if not t.get("key") and t.get("operator") != "Exists":
            out.append(f"{where}: a toleration without key needs operator Exists")
    return out


def render_problems(children: list[dict], pytorchjob_schema: dict | None) -> list[str]:
    """Why a real API server (or, for the pod template, the kubelet's API calls) would refuse
    one of the rendered objects; lines starting with LEAK are credentials in the clear."""
    import kubernetes_validate

    out: list[str] = []
    for obj in children:
        kind = obj["kind"]
        meta = obj["metadata"]
        if not _subdomain(meta["name"]):
            out.append(f"{kind}: name {meta['name']!r}")
        out += _labels(meta.get("labels"), f"{kind}.metadata.labels")
        if kind == "ConfigMap":
            try:
                kubernetes_validate.validate(obj, "1.33.0", strict=True)
            except kubernetes_validate.ValidationError as err:
                out.append(f"ConfigMap: {err}")
            size = sum(len(k) + len(v.encode()) for k, v in obj["data"].items())
            if size > 1024 * 1024:
                out.append(f"ConfigMap: {size} bytes of data (at most 1 MiB)")
            import yaml

            spec = yaml.safe_load(obj["data"]["job.yaml"])["spec"]
            for uri in [spec["model"]["source"], *(d["source"] for d in spec["datasets"])]:
                if _CREDENTIAL_URL.search(uri):
                    out.append(f"LEAK ConfigMap: a credential in {uri}")
            continue
        if kind == "Job":  # the pre-flight Job (batch/v1): the API's own schema
            try:
                kubernetes_validate.validate(obj, "1.33.0", strict=True)
            except kubernetes_validate.ValidationError as err:
                out.append(f"Job: {err}")
            out += _labels(obj["spec"]["template"]["metadata"].get("labels"), "Job pod labels")
            out += pod_problems(obj["spec"]["template"]["spec"], "Job pod")
            continue
        if pytorchjob_schema is not None:
            errors = list(jsonschema.Draft7Validator(pytorchjob_schema).iter_errors(obj))
            out += [f"PyTorchJob: {e.message[:200]}" for e in errors[:3]]
        for role, replica in obj["spec"]["pytorchReplicaSpecs"].items():
            template = replica["template"]
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **{
                k: v for k, v in template.get("metadata", {}).items()}},
                "spec": template["spec"]}
            try:
                kubernetes_validate.validate(pod, "1.33.0", strict=True)
            except kubernetes_validate.ValidationError as err:
                out.append(f"PyTorchJob {role} pod: {err}")
            out += _labels(template.get("metadata", {}).get("labels"), f"{role} pod labels")
            out += pod_problems(template["spec"], f"{role} pod")
    return out


# ------------------------------------------------------------------------ hostile bytes


def alias_bomb(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\n"


def hostile_files() -> dict[str, bytes]:
    """Named job files a careless or hostile user could hand to validate, render or run."""
    import yaml

    valid = yaml.safe_dump(base_job(), sort_keys=False)
    return {
        "latin-1": valid.replace("Kubetune", "Kubetuné").encode("latin-1"),
        "utf-16": valid.encode("utf-16"),
        "binary": bytes(range(256)) * 4,
        "nul": valid.encode() + b"\x00",
        "deep-flow": b"spec: " + b"[" * 5000 + b"]" * 5000,
        "deep-block": "".join("  " * i + f"k{i}:\n" for i in range(900)).encode() + b"x: 1\n",
        "deep-json": b"spec: " + b'{"a":' * 3000 + b"1" + b"}" * 3000,
        "alias-bomb": (valid + alias_bomb()).encode(),
        "alias-bomb-in-spec": valid.replace(
            "  template: auto", "  template: *i").encode() + b"\n" + alias_bomb().encode(),
        "recursive-anchor": valid.encode() + b"loop: &l [*l]\n",
        # Free-form fields (metadata, affinity) reach render: an alias bomb expands there.
        "alias-bomb-in-affinity": valid.replace(
            "  namespace: team-a\n", "  namespace: team-a\n  annotations:\n"
            + "".join("    " + line + "\n" for line in alias_bomb().splitlines())).replace(
            "  scheduling:\n", "  scheduling:\n    affinity: {nodeAffinity: *i}\n").encode(),
        "recursive-anchor-in-affinity": valid.replace(
            "  scheduling:\n", "  scheduling:\n    affinity: &l {nodeAffinity: [*l]}\n").encode(),
        "merge-key": valid.replace("  stage: sft", "  <<: {stage: sft}").encode(),
        "anchor-reuse": (
            b"apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\n"
            b"spec:\n  model: &m {source: hf://a/b}\n  datasets: [{source: pvc://d/x}]\n"
            b"  output: {uri: pvc://o/x}\n  extra: *m\n"),
        "duplicate-key": valid.replace("  stage: sft", "  stage: sft\n  stage: dpo").encode(),
        "huge": valid.encode() + b"# " + b"x" * (2 * 1024 * 1024) + b"\n",
        "many-docs": b"---\n{}\n" * 20000,
        "big-int": valid.replace("seed: 7", "seed: " + "9" * 300).encode(),
        "inf": valid.replace("epochs: 2.0", "epochs: .inf").encode(),
        "nan": valid.replace("weightDecay", "x").replace("epochs: 2.0", "epochs: .nan").encode(),
        "timestamp": valid.replace("  stage: sft", "  stage: 2024-01-01").encode(),
        "non-string-key": valid.replace("  stage: sft", "  1: sft").encode(),
        "tab-indent": valid.replace("  stage: sft", "\tstage: sft").encode(),
        "bom": b"\xef\xbb\xbf" + valid.encode(),
        "empty": b"",
        "scalar": b"42\n",
        "list": b"- 1\n- 2\n",
        "control-chars": valid.replace("name: Kubetune", 'name: "Kube\\x07tune"').encode(),
    }



# ------------------------------------------------------------------------ credential shapes

PLANTED = "Pl4nt3dS3cr3t"  # a credential planted in a job: it must never come out again
# Query names a block list would miss (any name may carry a credential), and separators.
_PARAM_NAMES = ("private_token", "hf_token", "api-key", "Authorization", "pass", "access_token",
                "X-Amz-Signature", "code", "k", "q", "download", "%74oken", "to%6Ben", "")


def credential_url_shapes(host: str = "host.example", scheme: str = "https",
                          planted: str = PLANTED) -> dict[str, str]:
    """Named ways a credential rides in a URL (the shapes the fuzz test of the issue found)."""
    base = f"{scheme}://{host}/m"
    pct = planted.replace("t", "%74")
    return {
        "userinfo": f"{scheme}://user:{planted}@{host}/m",
        "user-only": f"{scheme}://{planted}@{host}/m",
        "userinfo-pct": f"{scheme}://u%3A{planted}%40{host}/m",
        "userinfo-slash": f"{scheme}://u:{planted}/x@{host}/m",
        **{f"query-{n or 'bare'}": f"{base}?{n}={planted}" if n else f"{base}?{planted}"
           for n in _PARAM_NAMES},
        "query-after-safe": f"{base}?download=true&x={planted}",
        "query-semicolon": f"{base}?download=1;t={planted}",
        "query-pct-value": f"{base}?t={pct}",
        "fragment": f"{base}#access_token={planted}",
        "fragment-bare": f"{base}#{planted}",
    }


@st.composite
def credential_urls(draw, planted: str = PLANTED) -> str:
    """A URL with ``planted`` somewhere a credential can ride: user-info (plain or percent-
    encoded), a query parameter of any name, a fragment."""
    scheme = draw(st.sampled_from(["https", "http", "s3", "gs", "hf", "file", "pvc"]))
    host = draw(st.sampled_from(["h", "bucket-1", "a.b.example", "org", "127.0.0.1:8080", ""]))
    path = draw(st.sampled_from(["", "/", "/m", "/a/b.json", "/x@y/z"]))
    name = draw(st.one_of(st.sampled_from(_PARAM_NAMES),
                          st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.%",
                                  max_size=12)))
    value = planted if draw(st.booleans()) else "".join(
        f"%{ord(c):02X}" if i % 2 else c for i, c in enumerate(planted))
    safe = draw(st.sampled_from(["", "download=true&", "raw=1&", "dl=0&"]))
    where = draw(st.sampled_from(["userinfo", "user", "userinfo-pct", "query", "query-bare",
                                 "fragment"]))
    if where == "userinfo":
        return f"{scheme}://{name}:{value}@{host}{path}"
    if where == "user":
        return f"{scheme}://{value}@{host}{path}"
    if where == "userinfo-pct":
        return f"{scheme}://{name}%3A{value}%40{host}{path}"
    if where == "query":
        return f"{scheme}://{host}{path}?{safe}{name}={value}"
    if where == "query-bare":
        return f"{scheme}://{host}{path}?{safe}{value}"
    return f"{scheme}://{host}{path}{'?' + safe[:-1] if safe else ''}#{name}={value}"


@st.composite
def clean_urls(draw) -> str:
    """URLs with no place for a credential: a host (and port), a path, download/dl/raw."""
    scheme = draw(st.sampled_from(["https", "http", "s3", "gs", "hf", "file", "pvc"]))
    host = draw(st.from_regex(r"[A-Za-z0-9._~-]{0,20}(:[0-9]{1,5})?", fullmatch=True))
    path = draw(st.from_regex(r"(/[A-Za-z0-9._@:=+,-]{0,12}){0,4}", fullmatch=True))
    params = draw(st.lists(st.tuples(st.sampled_from(["download", "dl", "raw", "DL"]),
                                     st.sampled_from(["0", "1", "true", "false", "TRUE"])),
                           max_size=3))
    query = "?" + "&".join(f"{k}={v}" for k, v in params) if params else ""
    return f"{scheme}://{host}{path}{query}"


# Names a credential hides under (the issue's, and their cases and separators).
SECRET_ENV_NAMES = ("db.password", "db-password", "S3_SECRETKEY", "PASS", "GITHUB_PAT", "AUTH",
                    "BEARER", "APITOKEN", "AZURE_STORAGE_CONNECTION_STRING", "KEYS", "dbPassword",
                    "apiKey", "my.api-key", "SLACK_BOT_TOKEN", "Client_Secret", "PGPASSWORD")


def credential_values(planted: str = PLANTED) -> dict[str, str]:
    """Named plain values that carry ``planted`` as a credential, whatever the name."""
    token = f"ghp_{planted}0aZ{planted[::-1]}9Qx"
    return {
        "bearer": f"Bearer {planted}xyz",
        "basic": f"Basic {planted}==",
        "connection-string": f"Server=db;User Id=u;Password={planted};",
        "azure": f"DefaultEndpointsProtocol=https;AccountName=a;AccountKey={planted}==",
        "database-url": f"postgres://u:{planted}@db.example/app",
        "url-query": f"https://db.example/app?sslpassword={planted}",
        "arg-key": f"--api-key={planted}",
        "arg-token": f"--hf-token={planted}",
        "high-entropy": token,
        "hex-key": "0f" * 16 + planted.encode().hex(),
    }


# Words a credential's name is made of: those found inside a word too (camelCase), and those
# found only between separators (PAT, KEY: a ``sortKey`` is no secret).
_NAME_WORDS_ANYWHERE = ("token", "secret", "password", "passwd", "pwd", "credentials",
                        "apikey", "accessKey", "privateKey", "signingKey", "connectionString",
                        "connStr", "accountKey", "encryptionKey")
_NAME_WORDS_APART = ("pass", "pat", "auth", "bearer", "key", "keys", "dsn", "api_key")
_NAME_AFFIXES = ("", "db", "app", "github", "s3", "my", "x1", "azure_storage", "hf", "openai")


@st.composite
def credential_env_names(draw) -> str:
    """A variable name that says it holds a credential, composed: affixes around a credential
    word, joined by ``_``, ``.``, ``-`` or camelCase, in any case."""
    apart = draw(st.booleans())
    word = draw(st.sampled_from(_NAME_WORDS_APART if apart else _NAME_WORDS_ANYWHERE))
    before, after = draw(st.sampled_from(_NAME_AFFIXES)), draw(st.sampled_from(
        ("", "2", "value", "prod", "main")))
    sep = draw(st.sampled_from(["_", ".", "-"] + ([] if apart else [""])))
    if sep == "":  # camelCase: upper or lower case would hide where the word ends
        return (before + word[:1].upper() + word[1:] if before else word) + after.capitalize()
    name = sep.join(p for p in (before, word, after) if p)
    return draw(st.sampled_from([name, name.upper(), name.lower()]))


_TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+_=-"


@st.composite
def credential_tokens(draw, planted: str = PLANTED) -> str:
    """A plain value that is a credential whatever its name, composed around ``planted``: a
    long random token, an Authorization header, a connection string's secret, a URL with
    user-info, query or fragment, a --…key= or --…token= argument, a long hex key."""
    rand = draw(st.text(_TOKEN_CHARS, min_size=0, max_size=24))
    hexes = draw(st.text("0123456789abcdef", min_size=32, max_size=64))
    key = draw(st.sampled_from(["Password", "pwd", "AccountKey", "SharedAccessSignature",
                                "api_key", "access_token", "Secret", "auth"]))
    flag = draw(st.sampled_from(["api-key", "hf-token", "secret", "password", "auth",
                                 "access-key", "client-secret", "credentials"]))
    return draw(st.sampled_from([
        f"aZ9{rand}{planted}{'x' * 8}",
        f"{draw(st.sampled_from(['Bearer', 'Basic', 'token', 'BEARER']))} {planted}{rand}",
        f"Server=db;{key}={planted}{rand};",
        f"{draw(st.sampled_from(['postgres', 'mysql', 'redis', 'https', 'amqp']))}://"
        f"{draw(st.sampled_from(['u', '', 'admin']))}:{planted}@db.example/x",
        f"https://h.example/p?{draw(st.sampled_from(['sig', 'x', 'q', 'code']))}={planted}",
        f"https://h.example/p#{planted}",
        f"--{flag}={planted}{rand}", f"-{flag}={planted}",
        f"{hexes}{planted.encode().hex()}",
    ]))


@st.composite
def credential_env(draw, planted: str = PLANTED) -> dict[str, str]:
    """A trainer.env entry with a plain value that is a credential: by its name (any case,
    any separator; listed, or composed) or by its value (any name; listed, or composed)."""
    if draw(st.booleans()):
        base = draw(st.sampled_from(SECRET_ENV_NAMES))
        sep = draw(st.sampled_from(["_", ".", "-"]))
        name = draw(st.sampled_from([base, base.upper(), base.lower(), f"APP{sep}{base}",
                                     f"{base}{sep}2"]) | credential_env_names())
        return {"name": name, "value": planted}
    name = draw(st.from_regex(r"[A-Z][A-Z0-9_]{0,12}", fullmatch=True))
    values = sorted(credential_values(planted).values())
    return {"name": name, "value": draw(st.sampled_from(values) | credential_tokens(planted))}


# ------------------------------------------------------------------------ planted credentials

# Every URL-valued field, and how to make a job where it is read (the stage or section it
# belongs to), for planting a credential there.
URL_FIELDS: dict[str, str | None] = {
    "model.source": None, "datasets.0.source": None, "evalDatasets.0.source": "eval",
    "output.uri": None, "training.tracking.uri": "tracking", "rewards.0.source": "grpo",
    "rewards.1.path": "grpo", "evaluation.lmEval.include": "lmeval",
}
IMAGE_FIELDS = ("trainer.image", "serve.image")


def _prepare(spec: dict[str, Any], what: str | None) -> None:
    if what == "eval":
        spec["evalDatasets"] = [{"source": "pvc://data/eval.json"}]
        spec["training"].pop("evalSplit", None)
    elif what == "tracking":
        spec["training"]["reportTo"] = ["mlflow"]
        spec["training"]["tracking"] = {"uri": "https://mlflow.example"}
    elif what == "grpo":
        spec["stage"] = "grpo"
        spec["rewards"] = [{"type": "rewardModel", "source": "pvc://rm/model"},
                           {"type": "python", "function": "m:f", "path": "pvc://code/r"}]
    elif what == "lmeval":
        spec["evaluation"] = {"lmEval": {"tasks": ["arc_easy"]}}


def _put(spec: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = spec
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[parts[-1]] = value


@st.composite
def credential_images(draw, planted: str = PLANTED) -> str:
    """An image reference with ``planted`` as registry credentials, a query or a fragment."""
    user = draw(st.sampled_from(["u", "robot$ci", "", "a%40b"]))
    host = draw(st.sampled_from(["registry.example", "127.0.0.1:5000", "ghcr.io"]))
    value = planted if draw(st.booleans()) else planted.replace("t", "%74")
    tail = draw(st.sampled_from(["/t:1", "/t", f"/t@sha256:{'a' * 64}"]))
    return draw(st.sampled_from([
        f"{user}:{value}@{host}{tail}", f"{value}@{host}{tail}",
        f"{user}%3A{value}%40{host}{tail}", f"{host}{tail}?token={value}",
        f"{host}{tail}#{value}"]))


@st.composite
def planted_jobs(draw, spec_schema: dict, planted: str = PLANTED) -> dict[str, Any]:
    """A job (mutated within the schema's bounds) with ``planted`` put, one to three times,
    where a credential rides: a URL-valued field (user-info plain or percent-encoded, a query
    or fragment parameter of any name), an image, a trainer.env entry (by its name or its
    value) or a serve.args item."""
    doc = draw(mutated_jobs(spec_schema, valid=True))
    spec = doc["spec"]
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["url", "url", "image", "env", "args"]))
        if where in ("url", "image"):
            field = draw(st.sampled_from(sorted(URL_FIELDS) if where == "url" else
                                         IMAGE_FIELDS))
            value = draw(credential_urls(planted) if where == "url" else
                         credential_images(planted))
            try:
                _prepare(spec, URL_FIELDS.get(field))
                _put(spec, field, value)
            except (IndexError, KeyError, TypeError, AttributeError):
                spec["model"] = {"source": value}  # a mutation moved the field's parent
        elif where == "env":
            trainer = spec.setdefault("trainer", {})
            env = trainer.get("env") if isinstance(trainer.get("env"), list) else []
            trainer["env"] = [*env, draw(credential_env(planted))]
        else:
            serve = spec.setdefault("serve", {})
            serve["args"] = ["--max-model-len", "4096",
                             draw(st.sampled_from(sorted(credential_values(planted).values())))]
    return doc
