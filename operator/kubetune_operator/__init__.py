"""The kubetune operator: FineTuneJob → ConfigMap + PyTorchJob, and a status that tells the truth.

Importable without torch. Builders and status reducers are pure; Kubernetes I/O lives in
``reconcile``; kopf handlers in ``handlers`` are thin shims.
"""
