"""The trainer image's entrypoint: topology from a PyTorchJob's environment, and a real
2-process run on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LF_DATA, free_port, tiny_spec, write_job
from kubetune.strategy import STRATEGIES
from kubetune_trainer.launch import DEEPSPEED_DIR, command, topology


def _env(nnodes, rank, nproc):
    # What the training operator injects (PyTorchJob v1).
    return {"PET_NNODES": str(nnodes), "PET_NODE_RANK": str(rank), "RANK": str(rank),
            "PET_NPROC_PER_NODE": str(nproc), "MASTER_ADDR": "job-master-0",
            "MASTER_PORT": "23456"}


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_one_node_one_gpu_runs_the_trainer_directly():
    topo = topology(_env(1, 0, 1), gpus=1)
    assert command(topo, ["job.yaml"], python="py") == [
        "py", "-m", "kubetune_trainer.train", "job.yaml"]


def test_one_node_eight_gpus():
    cmd = command(topology(_env(1, 0, 8), gpus=8), ["job.yaml"], python="py")
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"]
    assert _flag(cmd, "--nproc_per_node") == "8" and _flag(cmd, "--nnodes") == "1"
    assert _flag(cmd, "--master_addr") == "job-master-0"
    assert cmd[cmd.index("kubetune_trainer.train") + 1:] == ["job.yaml"]


def test_a_trainjob_node_reads_trainer_v2s_master_variables():
    # What Kubeflow Trainer v2's torch plugin injects: PET_* only, no MASTER_ADDR/PORT.
    env = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "4",
           "PET_MASTER_ADDR": "ident-node-0-0.ident", "PET_MASTER_PORT": "29400"}
    topo = topology(env, gpus=4)
    assert (topo.master_addr, topo.master_port, topo.nnodes, topo.node_rank) == (
        "ident-node-0-0.ident", 29400, 2, 1)
    cmd = command(topo, ["job.yaml"], python="py")
    assert _flag(cmd, "--master_addr") == "ident-node-0-0.ident"
    assert _flag(cmd, "--master_port") == "29400"


def test_four_nodes_of_eight_gpus_without_deepspeed():
    cmd = command(topology(_env(4, 2, 8), gpus=8), ["job.yaml"], python="py")
    assert (_flag(cmd, "--nnodes"), _flag(cmd, "--node_rank"),
            _flag(cmd, "--nproc_per_node")) == ("4", "2", "8")


@pytest.mark.parametrize("rank", [0, 3])
def test_four_nodes_of_eight_gpus_with_deepspeed(rank):
    cmd = command(topology(_env(4, rank, 8), gpus=8), ["job.yaml", "--pvc-root", "/mnt/pvc"],
                  deepspeed="zero3", python="py")
    assert _flag(cmd, "--num_processes") == "32"  # accelerate counts every machine's
    assert _flag(cmd, "--num_machines") == "4" and _flag(cmd, "--machine_rank") == str(rank)
    assert _flag(cmd, "--main_process_ip") == "job-master-0"
    assert _flag(cmd, "--main_process_port") == "23456"
    assert _flag(cmd, "--deepspeed_config_file") == str(DEEPSPEED_DIR / "zero3.json")
    assert "--same_network" in cmd
    assert _flag(cmd, "--deepspeed_multinode_launcher") == "standard"  # not pdsh over ssh
    assert cmd[-3:] == ["job.yaml", "--pvc-root", "/mnt/pvc"]


def test_auto_processes_follow_the_gpus_and_elastic_node_counts_are_read():
    env = {**_env(1, 0, 1), "PET_NPROC_PER_NODE": "auto", "PET_NNODES": "2:2"}
    topo = topology(env, gpus=4)
    assert (topo.nnodes, topo.nproc_per_node, topo.world_size) == (2, 4, 8)
    assert topology({}, gpus=0).world_size == 1  # a CPU-only pod, or `docker run`


def test_deepspeed_configs_are_data_files():
    names = sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json"))
    assert names == ["zero2", "zero2_offload", "zero3", "zero3_offload"]
    for path in DEEPSPEED_DIR.glob("*.json"):
        assert "zero_optimization" in json.loads(path.read_text())
    with pytest.raises(SystemExit, match="no such config"):
        command(topology(_env(1, 0, 2), gpus=2), [], deepspeed="zero9")


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_has_its_config_and_reaches_the_launcher(strategy):
    """The operator's pod args (launcher_args) parse in kubetune-launch and pick the engine:
    ZeRO stages with their DeepSpeed JSON, fsdp2 with accelerate's FSDP2 config, ddp torchrun;
    a single process too for the sharding strategies (ZeRO-3 offload on one GPU)."""
    import yaml
    from kubetune.api.v1alpha1 import FineTuneJobSpec
    from kubetune.strategy import launcher_args
    from kubetune_trainer import launch

    spec = FineTuneJobSpec.model_validate({
        "model": {"source": "m"}, "datasets": [{"source": "d.json"}], "output": {"uri": "o"},
        "resources": {"gpusPerNode": 8, "nodes": 2, "strategy": strategy}})
    args = launcher_args(spec)
    assert args == ([] if strategy == "ddp" else ["--strategy", strategy])
    info = STRATEGIES[strategy]
    for nproc in (1, 8):
        parsed, rest = launch.parser().parse_known_args(["job.yaml", *args])
        cmd = command(topology(_env(2, 1, nproc), gpus=nproc), rest,
                      strategy=parsed.strategy, python="py")
        assert cmd[cmd.index("kubetune_trainer.train") + 1:] == ["job.yaml"]
        if info.engine is None:
            assert "accelerate.commands.launch" not in cmd
            continue
        assert _flag(cmd, "--num_processes") == str(2 * nproc)
        assert _flag(cmd, "--machine_rank") == "1"
        if info.engine == "deepspeed":
            # Every pod runs its own launcher: accelerate's default for several machines is
            # pdsh over SSH, which a PyTorchJob's pods do not have.
            assert _flag(cmd, "--deepspeed_multinode_launcher") == "standard"
            config = json.loads(Path(_flag(cmd, "--deepspeed_config_file")).read_text())
            zero = config["zero_optimization"]
            assert zero["stage"] == (3 if info.shard_weights else 2)
            assert ("offload_optimizer" in zero) == info.offload_optimizer
            assert ("offload_param" in zero) == info.offload_weights
            if info.shard_weights:  # a whole model on save, loadable with from_pretrained
                assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        else:
            assert "--use_fsdp" in cmd
            config = yaml.safe_load(Path(_flag(cmd, "--config_file")).read_text())
            assert config["distributed_type"] == "FSDP"
            assert config["fsdp_config"]["fsdp_version"] == 2
            assert config["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"


@pytest.mark.usefixtures("lf_data")
def test_two_processes_on_cpu_really_train(tiny_model, tmp_path):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_spec(
        tiny_model, [{"source": str(LF_DATA / "identity.json")}], out,
        training={"maxSteps": 4, "saveSteps": 2, "batchSizePerDevice": 2}))
    launcher = str(Path(sys.executable).parent / "kubetune-launch")
    env = {**os.environ, **_env(1, 0, 2), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([launcher, str(job)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.distributed.run" in proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 4


@pytest.mark.slow
@pytest.mark.usefixtures("lf_data")
def test_deepspeed_zero2_with_two_processes_on_cpu(tiny_model, tmp_path):
    """The DeepSpeed path for real: accelerate + ZeRO-2 from the bundled config, gloo on CPU
    (the first run compiles one DeepSpeed op, about a minute; cached after)."""
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_spec(
        tiny_model, [{"source": str(LF_DATA / "identity.json")}], out,
        training={"maxSteps": 4, "saveSteps": 2, "batchSizePerDevice": 2}))
    launcher = str(Path(sys.executable).parent / "kubetune-launch")
    cache = Path.home() / ".cache" / "kubetune" / "torch_extensions"
    env = {**os.environ, **_env(1, 0, 2), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(),
           "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(cache)}
    proc = subprocess.run([launcher, "--deepspeed", "zero2", str(job)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--use_deepspeed" in proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 4
    assert Path(result["adapter"], "adapter_config.json").exists()


def test_the_nodes_exit_code_keeps_the_contract():
    from kubetune_trainer.launch import exit_code

    assert exit_code(0, [0, 0]) == 0
    assert exit_code(1, [2, 143]) == 2  # a permanent error anywhere: permanent
    assert exit_code(1, [143, 143]) == 143 and exit_code(1, [0, 143]) == 143
    assert exit_code(1, [200]) == 200 and exit_code(1, []) == 200  # a rank crashed or died
    assert exit_code(-15, []) == 143 and exit_code(137, []) == 137


def test_a_permanent_error_under_torchrun_exits_2_not_1(tmp_path):
    """torchrun exits 1 whatever its ranks said: before, a bad spec on two processes was
    retried as if it could pass (and under PyTorchJob's ExitCode policy, 1 is permanent for
    any crash)."""
    job = write_job(tmp_path / "job.yaml", {"model": {"source": "m"}, "stage": "no-such"})
    launcher = str(Path(sys.executable).parent / "kubetune-launch")
    env = {**os.environ, **_env(1, 0, 2), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([launcher, str(job)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert "torch.distributed.run" in proc.stderr
    assert proc.returncode == 2, proc.stderr[-3000:]
    # The first rank to fail exits 2; torchrun then stops the other (which may not get to
    # write its code).
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kubetune-launch: exit 2 (launcher 1, ranks {'rank-") and \
        "': 2" in last, last
