"""Where the trainer's reports go: transformers' KEP-2779 progress to
``KUBEFLOW_TRAINER_SERVER_URL`` (Kubeflow's endpoint when Trainer v2's TrainJobStatus gate is
on), kubetune's own checkpoints and outputs always to ``KUBETUNE_PROGRESS_URL``. Two real
HTTP endpoints: kubetune's (the operator's app) and one that records what Kubeflow's gets."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from kubetune_operator.backends.pytorchjob import PYTORCHJOB
from kubetune_operator.reporting.auth import TokenChecker
from kubetune_operator.reporting.server import make_app
from kubetune_operator.reporting.store import ProgressStore
from test_reporting import URL, _pod, _review


@pytest.fixture
async def endpoints(tmp_path, monkeypatch):
    store = ProgressStore()
    kubetune = TestServer(make_app(store, TokenChecker(_review), pod_lookup=_pod,
                                            backend=PYTORCHJOB))
    kubeflow_got: list[tuple[str, dict]] = []

    async def kubeflow_status(request: web.Request) -> web.Response:
        kubeflow_got.append((request.headers["Authorization"], await request.json()))
        return web.json_response({})

    kubeflow_app = web.Application()
    kubeflow_app.router.add_post("/trainjobs/ident/status", kubeflow_status)
    kubeflow = TestServer(kubeflow_app)
    await kubetune.start_server()
    await kubeflow.start_server()
    (tmp_path / "kubetune-token").write_text("good\n")  # audience kubetune, this job's pod
    (tmp_path / "kubeflow-token").write_text("kubeflow-audience\n")
    # As the TrainJob backend renders a pod with the gate on; Trainer v2 adds KUBEFLOW_*.
    monkeypatch.setenv("KUBETUNE_PROGRESS_URL", str(kubetune.make_url(URL)))
    monkeypatch.setenv("KUBETUNE_PROGRESS_TOKEN", str(tmp_path / "kubetune-token"))
    monkeypatch.setenv("KUBEFLOW_TRAINER_SERVER_URL",
                       str(kubeflow.make_url("/trainjobs/ident/status")))
    monkeypatch.setenv("KUBEFLOW_TRAINER_SERVER_TOKEN", str(tmp_path / "kubeflow-token"))
    monkeypatch.delenv("KUBEFLOW_TRAINER_SERVER_CA_CERT", raising=False)
    monkeypatch.delenv("KUBETUNE_PROGRESS_CA_CERT", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    try:
        yield store, kubeflow_got
    finally:
        await kubetune.close()
        await kubeflow.close()


async def test_progress_goes_to_kubeflow_and_kubetunes_reports_to_kubetune(endpoints):
    from kubetune_trainer.progress import OperatorReport, post_to_operator
    from transformers.integrations.integration_utils import KubeflowCallback
    from transformers.trainer_callback import TrainerControl, TrainerState

    store, kubeflow_got = endpoints
    state = TrainerState(max_steps=10, global_step=0)
    control = TrainerControl()
    kubeflow = KubeflowCallback()
    report = OperatorReport("pvc://out/ident")

    def train() -> None:  # the callbacks as the Trainer calls them, blocking HTTP included
        kubeflow.on_train_begin(None, state, control)
        state.global_step = 5
        state.log_history.append({"loss": 1.5, "step": 5})
        kubeflow.on_log(None, state, control, logs={"loss": 1.5})
        report.on_save(None, state, control)
        state.global_step = 10
        kubeflow.on_train_end(None, state, control)
        assert post_to_operator({"outputs": {"adapter": "pvc://out/ident/adapter"}})

    await asyncio.to_thread(train)

    # Kubeflow's endpoint: transformers' trainerStatus only, with Kubeflow's token.
    assert [auth for auth, _ in kubeflow_got] == ["Bearer kubeflow-audience"] * 2
    assert all(set(body) == {"trainerStatus"} for _, body in kubeflow_got)
    assert kubeflow_got[-1][1]["trainerStatus"]["progressPercentage"] == 100
    # kubetune's endpoint took the checkpoint and the outputs (its token review passed).
    snap = store.get("team-a", "ident")
    assert snap["checkpoints"] == [{"step": 5, "loss": 1.5,
                                    "uri": "pvc://out/ident/checkpoints/checkpoint-5"}]
    assert snap["outputs"] == {"adapter": "pvc://out/ident/adapter"}
    assert "percent" not in snap  # no progress went to kubetune's endpoint


async def test_no_kubetune_endpoint_means_no_report_even_with_kubeflows(endpoints,
                                                                         monkeypatch):
    from kubetune_trainer.progress import post_to_operator

    store, kubeflow_got = endpoints
    monkeypatch.delenv("KUBETUNE_PROGRESS_URL")
    sent = await asyncio.to_thread(post_to_operator, {"outputs": {"adapter": "pvc://o/a"}})
    assert sent is False
    assert kubeflow_got == [] and store.get("team-a", "ident") is None
