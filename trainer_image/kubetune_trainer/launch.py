"""The trainer image's entrypoint: one launcher per node, topology from the pod.

A PyTorchJob injects PET_NNODES, PET_NODE_RANK (or RANK), PET_NPROC_PER_NODE, MASTER_ADDR
and MASTER_PORT; a Kubeflow Trainer v2 TrainJob the same PET_* with PET_MASTER_ADDR and
PET_MASTER_PORT. One node with one process runs the trainer directly; more processes go
through torchrun, or through accelerate with DeepSpeed when ``--deepspeed`` names a config
from ``deepspeed/`` (kept as data files).

    kubetune-launch /etc/kubetune/job.yaml --pvc-root /mnt/pvc [--deepspeed zero2]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEEPSPEED_DIR = Path(__file__).resolve().parent / "deepspeed"


@dataclass(frozen=True)
class Topology:
    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    gpus: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def _int(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        value = env.get(name)
        if value:
            # torchrun's elastic form "MIN:MAX": a fixed-size job uses MAX.
            return int(value.split(":")[-1])
    return default


def topology(env: Mapping[str, str], gpus: int) -> Topology:
    """Where this node sits in the job, from the PyTorchJob's or the TrainJob's environment."""
    per_node = env.get("PET_NPROC_PER_NODE", "auto")
    if per_node in ("auto", "gpu"):
        nproc = max(gpus, 1)
    elif per_node == "cpu":
        nproc = 1
    else:
        nproc = int(per_node)
    return Topology(
        nnodes=_int(env, "PET_NNODES", default=1),
        node_rank=_int(env, "PET_NODE_RANK", "RANK", default=0),
        nproc_per_node=nproc,
        master_addr=env.get("MASTER_ADDR") or env.get("PET_MASTER_ADDR") or "127.0.0.1",
        master_port=_int(env, "MASTER_PORT", "PET_MASTER_PORT", default=29500),
        gpus=gpus,
    )


def command(topo: Topology, trainer_args: list[str], *, deepspeed: str | None = None,
            python: str = sys.executable) -> list[str]:
    """The command line that starts this node's training processes.

    Plain data parallel goes through torchrun (NCCL on GPUs, gloo on CPU); DeepSpeed through
    `accelerate launch`, which writes DeepSpeed's own launch settings.
    """
    train = ["-m", "kubetune_trainer.train", *trainer_args]
    if topo.world_size == 1 and not deepspeed:
        return [python, *train]
    if not deepspeed:
        return [python, "-m", "torch.distributed.run",
                "--nnodes", str(topo.nnodes), "--node_rank", str(topo.node_rank),
                "--nproc_per_node", str(topo.nproc_per_node),
                "--master_addr", topo.master_addr, "--master_port", str(topo.master_port),
                *train]
    config = DEEPSPEED_DIR / f"{deepspeed}.json"
    if not config.exists():
        known = sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json"))
        raise SystemExit(f"--deepspeed {deepspeed}: no such config; known: {known}")
    cmd = [python, "-m", "accelerate.commands.launch",
           "--num_machines", str(topo.nnodes),
           "--machine_rank", str(topo.node_rank),
           "--num_processes", str(topo.world_size),  # accelerate counts all machines
           "--main_process_ip", topo.master_addr,
           "--main_process_port", str(topo.master_port),
           "--mixed_precision", "no",  # the trainer picks bf16/fp16 from the job
           "--dynamo_backend", "no",
           "--use_deepspeed", "--deepspeed_config_file", str(config)]
    if topo.nnodes > 1:
        cmd += ["--same_network", "--rdzv_backend", "static"]
    return cmd + train


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kubetune-launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed", help="a config in kubetune_trainer/deepspeed/ (e.g. zero2)")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    args, trainer_args = p.parse_known_args(argv)
    topo = topology(os.environ, gpu_count())
    cmd = command(topo, trainer_args, deepspeed=args.deepspeed)
    print("kubetune-launch:", " ".join(cmd), file=sys.stderr, flush=True)
    if args.dry_run:
        return
    os.execv(cmd[0], cmd)  # the launcher becomes the trainer: signals and exit codes pass


if __name__ == "__main__":
    main()
