"""The peer for bench/operator_scale.py: a bare kopf operator with the least work per job.

It creates one small PyTorchJob per FineTuneJob with the same client and sets a phase: the
floor that kopf, the client and the emulator impose, against which kubetune's work is measured.
"""

from __future__ import annotations

import kopf
from kubernetes import client, config


@kopf.on.startup()
def setup(memo: kopf.Memo, **_):
    config.load_kube_config()
    memo.custom = client.CustomObjectsApi()


@kopf.on.create("kubetune.io", "v1alpha1", "finetunejobs")
def create(name, namespace, patch, memo: kopf.Memo, **_):
    memo.custom.create_namespaced_custom_object(
        "kubeflow.org", "v1", namespace, "pytorchjobs",
        {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
         "metadata": {"name": name, "namespace": namespace},
         "spec": {"pytorchReplicaSpecs": {}}})
    patch.status["phase"] = "Pending"
