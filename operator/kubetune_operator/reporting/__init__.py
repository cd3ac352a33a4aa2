"""Progress from training pods: the Kubeflow KEP-2779 contract, server side.

Pods POST ``{"trainerStatus": {...}}`` (transformers' KubeflowCallback does it by itself when
``KUBEFLOW_TRAINER_SERVER_URL`` is set) with a projected service-account token whose audience
is ``kubetune`` (``auth``: a TokenReview, then only a pod of that very job: same namespace, a
pod name its backend gives — ``<job>-master-N`` for a PyTorchJob, ``<job>-node-N-M-xxxxx``
for a TrainJob, ``<job>-[N-]xxxxx`` for a Job — owned as that backend owns its pods). Pods get
no RBAC on the Kubernetes API. kubetune's trainer adds ``{"kubetune": {"checkpoint"|"outputs"}}``.

- ``server``: the HTTP endpoint and its slow-client limits;
- ``clean``: a report made safe for the status (the KEP-2779 mapping included);
- ``store``: the latest report per job, in memory;
- ``flusher``: statuses patched at most every few seconds per job and ``rate`` per second
  overall, so a thousand jobs do not flood the API (``StatusWriter``: one patch).
"""
