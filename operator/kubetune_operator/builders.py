"""Pure builders: a FineTuneJob in, Kubernetes objects out. No I/O, no kopf.

Every builder is keyword-only and deterministic (same job → same object), so the reconciler can
create-if-missing safely and `kubetune render` shows exactly what the operator would create.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml
from kubetune import credentials
from kubetune.api.v1alpha1 import API_VERSION, KIND, PLURAL, FineTuneJob
from kubetune.strategy import launcher_args

from kubetune_operator.settings import OperatorConfig

MANAGED_BY = "kubetune"
JOB_LABEL = "kubetune.io/job"
SPEC_HASH = "kubetune.io/spec-hash"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta1"  # Workloads
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # Kueue's label on a job's Workload
SUSPEND_APPLIED = "kubetune.io/suspend-applied"  # the spec.suspend last carried to the child

CONFIG_DIR = "/etc/kubetune"
CONFIG_KEY = "job.yaml"
PVC_ROOT = "/mnt/pvc"
TOKEN_DIR = "/var/run/secrets/kubetune"
PROGRESS_AUDIENCE = "kubetune"
# The ConfigMap, in each job's namespace, with the CA the pods check the progress endpoint
# against: the operator keeps it (progress_tls.CaPublisher) unless the settings name the
# user's own (progress_ca_configmap).
PROGRESS_CA_CONFIGMAP = "kubetune-progress-ca"
PROGRESS_CA_KEY = "ca.crt"


def progress_ca_configmap(config: OperatorConfig) -> str | None:
    """The ConfigMap pods mount the progress endpoint's CA from: none for plain HTTP (named
    in the URL) or no endpoint; the user's when the settings name one; else the operator's."""
    if not config.progress_url or config.progress_plain_http:
        return None
    return config.progress_ca_configmap or PROGRESS_CA_CONFIGMAP


def child_name(job: FineTuneJob) -> str:
    return job.metadata.name


def config_name(job: FineTuneJob) -> str:
    return f"{job.metadata.name}-config"


def spec_hash(job: FineTuneJob) -> str:
    """What the training children were rendered from (suspend aside: it is applied in place;
    serve aside: it makes other objects, after the run). Defaults are left out, so that a
    field a newer operator adds with a default does not read as a change to jobs in flight."""
    spec = job.spec.model_dump(mode="json", by_alias=True, exclude={"suspend", "serve"},
                               exclude_defaults=True)
    raw = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def owner_reference(*, name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def _labels(job: FineTuneJob) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": MANAGED_BY, "app.kubernetes.io/name": "kubetune",
            JOB_LABEL: job.metadata.name}


def _metadata(job: FineTuneJob, name: str, uid: str | None, extra_labels=None
              ) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {**_labels(job), **(extra_labels or {})},
                            "annotations": {SPEC_HASH: spec_hash(job)}}
    if job.metadata.namespace:
        meta["namespace"] = job.metadata.namespace
    if uid:
        meta["ownerReferences"] = [owner_reference(name=job.metadata.name, uid=uid)]
    return meta


def trainer_config(job: FineTuneJob) -> str:
    """The job as the trainer reads it: only the API's fields, secrets only by reference.
    Plain ``trainer.env`` values and ``serve.args`` are left out: the container's env carries
    the variables, the operator reads the server's arguments from the FineTuneJob, and the
    trainer needs neither (a ConfigMap is readable by whoever may read the namespace's
    configuration)."""
    spec = job.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    trainer = spec.get("trainer") or {}
    if "env" in trainer:
        trainer["env"] = [e for e in trainer["env"] if "value" not in e]
        if not trainer["env"]:
            del trainer["env"]
    (spec.get("serve") or {}).pop("args", None)
    doc = {"apiVersion": API_VERSION, "kind": KIND,
           "metadata": {"name": job.metadata.name}, "spec": spec}
    # libyaml's emitter when PyYAML has it (the same text, 5x less CPU per job).
    return yaml.dump(doc, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False)


def config_map(*, job: FineTuneJob, uid: str | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(job, config_name(job), uid),
            "data": {CONFIG_KEY: trainer_config(job)}}


def pvc_claims(job: FineTuneJob) -> dict[str, bool]:
    """Claims the pods mount under /mnt/pvc/CLAIM, and whether each is written to."""
    claims: dict[str, bool] = {}
    sources = [job.spec.model.source, *(d.source for d in job.spec.datasets)]
    for uri in sources:
        if uri and uri.startswith("pvc://"):  # no model source: fromJob, resolved later
            claims.setdefault(uri[6:].split("/", 1)[0], False)
    if job.spec.output.uri.startswith("pvc://"):
        claims[job.spec.output.uri[6:].split("/", 1)[0]] = True
    return claims


def _env(job: FineTuneJob, config: OperatorConfig, progress: bool = True
         ) -> list[dict[str, Any]]:
    spec = job.spec
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "KUBETUNE_CACHE", "value": "/tmp/kubetune"},  # on the scratch volume
        *([{"name": "KUBETUNE_PREPARED_DIR", "value": where}]  # shared: pre-flight, restarts
          if (where := prepared_dir(job)) else []),
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        {"name": "KUBETUNE_JOB", "value": job.metadata.name},
        {"name": "KUBETUNE_GRACE_SECONDS",  # the save's budget after SIGTERM
         "value": str(spec.run_policy.termination_grace_period_seconds)},
    ]
    env += credentials.k8s_env(spec)  # every secretRef, per source (kubetune.credentials)
    if config.progress_url:
        # kubetune's endpoint: the trainer posts its own reports (checkpoints, outputs) here,
        # whichever endpoint gets the training progress.
        namespace = job.metadata.namespace or "default"
        url = (f"{config.progress_url.rstrip('/')}/namespaces/{namespace}"
               f"/{PLURAL}/{job.metadata.name}/status")
        reporting = [("URL", url), ("TOKEN", f"{TOKEN_DIR}/token")]
        if progress_ca_configmap(config):
            reporting.append(("CA_CERT", f"{TOKEN_DIR}/{PROGRESS_CA_KEY}"))
        env += [{"name": f"KUBETUNE_PROGRESS_{k}", "value": v} for k, v in reporting]
        if progress:
            # Kubeflow KEP-2779, to kubetune's endpoint too: transformers' KubeflowCallback
            # posts the training progress here by itself. A backend with its own endpoint
            # (Trainer v2 with its TrainJobStatus gate) sets these variables itself.
            env += [{"name": f"KUBEFLOW_TRAINER_SERVER_{k}", "value": v}
                    for k, v in reporting]
    # The job's own variables, in its order; a credential only as a Secret reference. The API
    # refuses names kubetune sets above, so nothing here replaces one of them.
    for var in (spec.trainer.env or []) if spec.trainer else []:
        if var.value_from is not None:
            ref = var.value_from.secret_key_ref
            env.append({"name": var.name, "valueFrom": {
                "secretKeyRef": {"name": ref.name, "key": ref.key}}})
        else:
            env.append({"name": var.name, "value": var.value})
    return env


def _resources(job: FineTuneJob) -> dict[str, Any]:
    r = job.spec.resources
    amounts: dict[str, Any] = {}
    if r.gpus_per_node:
        amounts["nvidia.com/gpu"] = str(r.gpus_per_node)
    if r.cpu:
        amounts["cpu"] = r.cpu
    if r.memory:
        amounts["memory"] = r.memory
    return {"limits": dict(amounts), "requests": dict(amounts)} if amounts else {}


def _volumes(job: FineTuneJob, config: OperatorConfig
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_name(job)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory",
                                      "sizeLimit": job.spec.resources.shared_memory}},
        {"name": "scratch", "emptyDir": ({"sizeLimit": job.spec.resources.scratch_size}
                                         if job.spec.resources.scratch_size else {})},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": "/tmp"},
    ]
    for i, (claim, writable) in enumerate(sorted(pvc_claims(job).items())):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {
            "claimName": claim, "readOnly": not writable}})
        mounts.append({"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}",
                       "readOnly": not writable})
    if config.progress_url:  # kubetune's token, whichever endpoint gets the progress
        sources: list[dict[str, Any]] = [{"serviceAccountToken": {
            "audience": PROGRESS_AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]
        if ca := progress_ca_configmap(config):  # the pod starts once it is there
            sources.append({"configMap": {"name": ca, "items": [
                {"key": PROGRESS_CA_KEY, "path": PROGRESS_CA_KEY}]}})
        volumes.append({"name": "kubetune-token", "projected": {"sources": sources}})
        mounts.append({"name": "kubetune-token", "mountPath": TOKEN_DIR, "readOnly": True})
    return volumes, mounts


# ----------------------------------------------------------------------- Pod Security
# Every pod kubetune makes passes Pod Security "restricted" (and so "baseline"): never root
# (runAsNonRoot with the image's uid), seccomp RuntimeDefault, no privilege escalation, every
# capability dropped, only configMap, emptyDir, persistentVolumeClaim and projected volumes; and
# a read-only root filesystem, with emptyDirs where the containers write (/tmp: HOME and the
# caches; /dev/shm). The one way out is the operator's pod_host_network (hostNetwork), which
# the cluster admin turns on by name. A job with another image names its uid, gid and a
# writable root in spec.trainer.securityContext / spec.serve.securityContext.

RUNTIME_DEFAULT = {"type": "RuntimeDefault"}


def run_as(override: Any, user: int, group: int) -> tuple[int, int, bool]:
    """(uid, gid, read-only root) from a job's securityContext over the operator's uid/gid.
    A job that names only its uid gets that as its gid too (the usual USER n:n)."""
    if override is None:
        return user, group, True
    uid = override.run_as_user if override.run_as_user is not None else user
    if override.run_as_group is not None:
        gid = override.run_as_group
    else:
        gid = override.run_as_user if override.run_as_user is not None else group
    read_only = override.read_only_root_filesystem is not False
    return uid, gid, read_only


def container_security(read_only: bool) -> dict[str, Any]:
    """A container's own part of the profile (the pod's carries who it runs as)."""
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": read_only}


def pod_security(uid: int, gid: int) -> dict[str, Any]:
    """The pod's: its containers (and any a webhook adds) run as ``uid``:``gid``, never root;
    volumes that honour fsGroup (claims, emptyDirs, configMaps) are made group ``gid``'s, only
    when their top directory is not already (OnRootMismatch: a big claim is not walked on
    every start)."""
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "fsGroup": gid,
            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": dict(RUNTIME_DEFAULT)}


def trainer_run_as(job: FineTuneJob, config: OperatorConfig) -> tuple[int, int, bool]:
    trainer = job.spec.trainer
    return run_as(trainer.security_context if trainer else None, config.pod_run_as_user,
                  config.pod_run_as_group)


def pod_template(*, job: FineTuneJob, config: OperatorConfig, role: str, container: str,
                 progress: bool = True) -> dict[str, Any]:
    """The trainer pod, whichever backend runs it. ``progress``: point transformers' KEP-2779
    reports at kubetune's endpoint too (a backend with its own, Trainer v2's, passes False;
    kubetune's own reports always go to kubetune's endpoint)."""
    spec = job.spec
    volumes, mounts = _volumes(job, config)
    uid, gid, read_only = trainer_run_as(job, config)
    image = (spec.trainer.image if spec.trainer and spec.trainer.image
             else config.trainer_image)
    main: dict[str, Any] = {
        "name": container,  # each backend has its own (PyTorchJob requires "pytorch")
        "image": image,
        "command": ["kubetune-launch"],  # accelerate, topology from the PET_* variables
        "args": [f"{CONFIG_DIR}/{CONFIG_KEY}", "--pvc-root", PVC_ROOT,
                 *launcher_args(spec)],  # resources.strategy: DeepSpeed / FSDP
        "env": _env(job, config, progress),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security(read_only),
    }
    resources = _resources(job)
    if resources:
        main["resources"] = resources
    # SIGTERM → the trainer finishes its step, saves, exits 143 before SIGKILL (preemption.py;
    # KUBETUNE_GRACE_SECONDS in _env)
    pod: dict[str, Any] = {"securityContext": pod_security(uid, gid), "containers": [main],
                           "volumes": volumes, "terminationGracePeriodSeconds":
                           spec.run_policy.termination_grace_period_seconds}
    sched = spec.scheduling
    if sched:
        if sched.node_selector:
            pod["nodeSelector"] = dict(sched.node_selector)
        if sched.tolerations:
            pod["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True)
                                  for t in sched.tolerations]
        if sched.affinity:
            pod["affinity"] = dict(sched.affinity)
        if sched.priority_class_name:
            pod["priorityClassName"] = sched.priority_class_name
    if "priorityClassName" not in pod and config.default_priority_class:
        pod["priorityClassName"] = config.default_priority_class
    if spec.trainer and spec.trainer.service_account_name:
        pod["serviceAccountName"] = spec.trainer.service_account_name
    if config.pod_host_network:  # the one way out of Pod Security "baseline"/"restricted"
        pod["hostNetwork"] = True
        pod["dnsPolicy"] = "ClusterFirstWithHostNet"  # cluster names still resolve
    return {"metadata": {"labels": {**_labels(job), "kubetune.io/role": role}}, "spec": pod}


def kueue_labels(labels: dict[str, str] | None, config: OperatorConfig) -> dict[str, str]:
    """The FineTuneJob's Kueue labels, passed to the training object so Kueue queues and
    admits it; the default queue for a job that names none."""
    passed = {k: v for k, v in (labels or {}).items()
              if k in (KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL)}
    if config.default_queue and KUEUE_QUEUE_LABEL not in passed:
        passed[KUEUE_QUEUE_LABEL] = config.default_queue
    return passed


def child_metadata(job: FineTuneJob, uid: str | None, labels: dict[str, str]
                   ) -> dict[str, Any]:
    """The training object's metadata: ours, Kueue's labels, what suspend we applied."""
    meta = _metadata(job, child_name(job), uid, labels)
    meta["annotations"][SUSPEND_APPLIED] = str(job.spec.suspend).lower()
    return meta


# ----------------------------------------------------------------------- pre-flight

PREFLIGHT_ROLE = "preflight"
ROLE_LABEL = "kubetune.io/role"


def preflight_mode(job: FineTuneJob, config: OperatorConfig) -> str:
    """spec.preflight, else the operator's default: auto, always or skip."""
    return job.spec.preflight or config.preflight


def wants_preflight(job: FineTuneJob, config: OperatorConfig) -> bool:
    """Whether a pre-flight pod runs before the training object: always, or (auto) when the
    job asks for GPUs (a CPU job's own pod is as cheap as a pre-flight one)."""
    mode = preflight_mode(job, config)
    return mode == "always" or (mode == "auto" and job.spec.resources.gpus_per_node > 0)


def preflight_name(job: FineTuneJob) -> str:
    return f"{child_name(job)}-preflight"


def is_preflight(obj: dict[str, Any]) -> bool:
    return (obj.get("metadata", {}).get("labels") or {}).get(ROLE_LABEL) == PREFLIGHT_ROLE


def prepared_dir(job: FineTuneJob) -> str | None:
    """Where the prepared rows live for a pvc:// output: on that volume, beside the outputs
    (the one place there the job is sure to be able to write: a claim's root may be another
    owner's), so the pre-flight pod's are the training pods' (and a restarted pod's)."""
    uri = job.spec.output.uri
    if not uri.startswith("pvc://"):
        return None
    return f"{PVC_ROOT}/{uri[len('pvc://'):].strip('/')}/.kubetune/prepared"


def preflight_job(*, job: FineTuneJob, config: OperatorConfig, uid: str | None = None,
                  gpu_memory: float | None = None) -> dict[str, Any]:
    """The pre-flight Job (batch/v1): the trainer image on CPU with the job's own volumes,
    credentials and settings, no GPU, no node selection of the job's (those pick GPU nodes),
    not queued (Kueue admits the training object). ``gpu_memory``: bytes of one of the job's
    GPUs, for the memory verdict."""
    pod = pod_template(job=job, config=config, role=PREFLIGHT_ROLE, container=PREFLIGHT_ROLE)
    spec = pod["spec"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        spec.pop(key, None)
    spec["restartPolicy"] = "Never"
    spec["terminationGracePeriodSeconds"] = 30
    spec["automountServiceAccountToken"] = False  # it calls no Kubernetes API
    main = spec["containers"][0]
    main["command"] = ["kubetune-preflight"]
    main["args"] = [f"{CONFIG_DIR}/{CONFIG_KEY}", "--pvc-root", PVC_ROOT]
    main["resources"] = {}
    for section, resource, quantity in config.preflight_resources:
        main["resources"].setdefault(section, {})[resource] = quantity
    main["env"] = [e for e in main["env"] if not e["name"].startswith("KUBEFLOW_TRAINER_")]
    if gpu_memory:
        main["env"].append({"name": "KUBETUNE_GPU_MEMORY", "value": str(int(gpu_memory))})
    if job.spec.output.uri.startswith(("s3://", "gs://")):  # no claim: the rows go there
        main["env"].append({"name": "KUBETUNE_SHARE_PREPARED", "value": "1"})
    meta = _metadata(job, preflight_name(job), uid, {ROLE_LABEL: PREFLIGHT_ROLE})
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"backoffLimit": 0, "template": pod}}
