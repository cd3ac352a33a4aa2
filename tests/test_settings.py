"""The operator's settings: read once from the environment, a bad value named."""

from __future__ import annotations

import pytest
from kubetune_operator.backends import backend_named
from kubetune_operator.settings import OperatorConfig


def test_settings_from_the_environment():
    config = OperatorConfig.from_env({
        "KUBETUNE_BACKEND": "trainjob", "KUBETUNE_TRAINING_RUNTIME": "team-torch",
        "KUBETUNE_TRAINER_STATUS": "true", "KUBETUNE_RECHECK_SECONDS": "2.5",
        "KUBETUNE_WORKERS": "4", "KUBETUNE_SCANNING": "false", "KUBETUNE_PROGRESS_PORT": "8443",
        "KUBETUNE_SERVE_ARGS": "--max-model-len 4096", "KUBETUNE_FAILURE_LOG_TAIL": "False",
        "KUBETUNE_POD_HOST_NETWORK": "true", "KUBETUNE_PREFLIGHT_RESOURCES":
            '{"requests": {"cpu": "2", "memory": "16Gi"}, "limits": {"memory": "32Gi"}}'})
    assert (backend_named(config.backend).kind, config.training_runtime,
            config.trainer_status) == ("TrainJob", "team-torch", True)
    assert (config.recheck_seconds, config.workers, config.scanning, config.progress_port) == (
        2.5, 4, False, 8443)
    assert config.serve_args == ("--max-model-len", "4096")
    assert config.failure_log_tail is False and config.pod_host_network is True
    assert config.preflight_resources == (("requests", "cpu", "2"), ("requests", "memory", "16Gi"),
                                          ("limits", "memory", "32Gi"))
    assert OperatorConfig.from_env({}) == OperatorConfig()


@pytest.mark.parametrize(("env", "message"), [
    ({"KUBETUNE_WORKERS": "many"}, "KUBETUNE_WORKERS='many': expected an integer"),
    ({"KUBETUNE_SCANNING": "no"}, "KUBETUNE_SCANNING='no': expected true or false"),
    ({"KUBETUNE_PREFLIGHT_RESOURCES": '{"requests": {"nvidia.com/gpu": "1"}}'},
     "requests.nvidia.com/gpu: expected one of cpu, memory, ephemeral-storage"),
    ({"KUBETUNE_PREFLIGHT_RESOURCES": '{"limits": {"memory": "lots"}}'},
     "limits.memory='lots': not a quantity"),
    ({"KUBETUNE_PREFLIGHT_RESOURCES":
      '{"requests": {"memory": "9Gi"}, "limits": {"memory": "8Gi"}}'},
     "requests.memory is above limits.memory"),
])
def test_a_bad_setting_is_named(env, message):
    with pytest.raises(ValueError, match=message):
        OperatorConfig.from_env(env)

