"""The trainer image's entrypoint: one launcher per node, topology from the pod.

A PyTorchJob injects PET_NNODES, PET_NODE_RANK (or RANK), PET_NPROC_PER_NODE, MASTER_ADDR
and MASTER_PORT (a Kubeflow Trainer v2 TrainJob: PET_MASTER_ADDR and PET_MASTER_PORT).
``--strategy`` is the job's resources.strategy (``kubetune.strategy``): ddp
runs one process directly, more through torchrun; the DeepSpeed ZeRO strategies and fsdp2 go
through `accelerate launch` with a config from ``deepspeed/`` (kept as data files), even for a
single process (ZeRO-3 offload on one GPU).

    kubetune-launch /etc/kubetune/job.yaml --pvc-root /mnt/pvc [--strategy zero3]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kubetune.strategy import STRATEGIES

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


def command(topo: Topology, trainer_args: list[str], *, strategy: str = "ddp",
            deepspeed: str | None = None, python: str = sys.executable) -> list[str]:
    """The command line that starts this node's training processes.

    ddp goes through torchrun (NCCL on GPUs, gloo on CPU); DeepSpeed and FSDP through
    `accelerate launch`, which writes their launch settings. ``deepspeed`` names any config
    file in ``deepspeed/`` (without .json) instead of a strategy's own.
    """
    train = ["-m", "kubetune_trainer.train", *trainer_args]
    if strategy not in STRATEGIES:
        raise SystemExit(f"--strategy {strategy}: unknown; known: {sorted(STRATEGIES)}")
    info = STRATEGIES[strategy]
    engine, config_name = ("deepspeed", f"{deepspeed}.json") if deepspeed else \
        (info.engine, info.config)
    if engine is None:
        if topo.world_size == 1:
            return [python, *train]
        return [python, "-m", "torch.distributed.run",
                "--nnodes", str(topo.nnodes), "--node_rank", str(topo.node_rank),
                "--nproc_per_node", str(topo.nproc_per_node),
                "--master_addr", topo.master_addr, "--master_port", str(topo.master_port),
                *train]
    config = DEEPSPEED_DIR / str(config_name)
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
           "--dynamo_backend", "no"]
    if engine == "deepspeed":
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(config)]
        if topo.nnodes > 1:  # one launcher per pod (torchrun), not pdsh over SSH (the default)
            cmd += ["--deepspeed_multinode_launcher", "standard"]
    else:  # fsdp: accelerate's own config file (FSDP2 settings); the topology above wins
        cmd += ["--config_file", str(config), "--use_fsdp"]
    if topo.nnodes > 1:
        cmd += ["--same_network", "--rdzv_backend", "static"]
    return cmd + train


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def parser() -> argparse.ArgumentParser:
    """kubetune-launch's own options; the rest go to the trainer."""
    p = argparse.ArgumentParser(prog="kubetune-launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", default="ddp", choices=sorted(STRATEGIES),
                   help="the job's resources.strategy (default ddp)")
    p.add_argument("--deepspeed", help="a DeepSpeed config in kubetune_trainer/deepspeed/ "
                   "(e.g. zero2), instead of the strategy's")
    p.add_argument("--nproc", type=int, help="processes on this node (default: "
                   "PET_NPROC_PER_NODE, else one per GPU, else one)")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    return p


def main(argv: list[str] | None = None) -> None:
    args, trainer_args = parser().parse_known_args(argv)
    env = dict(os.environ)
    if args.nproc:
        env["PET_NPROC_PER_NODE"] = str(args.nproc)
    topo = topology(env, gpu_count())
    cmd = command(topo, trainer_args, strategy=args.strategy, deepspeed=args.deepspeed)
    print("kubetune-launch:", " ".join(cmd), file=sys.stderr, flush=True)
    if args.dry_run:
        return
    if cmd[1:3] == ["-m", "kubetune_trainer.train"]:
        os.execv(cmd[0], cmd)  # the launcher becomes the trainer: signals and exit codes pass
    sys.exit(supervise(cmd))


def supervise(cmd: list[str], env: Mapping[str, str] | None = None) -> int:
    """Run torchrun / accelerate launch as a child and pass the exit-code contract on.

    They exit 1 whatever their processes' codes were, so each rank writes its own to
    ``KUBETUNE_EXIT_DIR`` (``train._exit_file``) and ``exit_code`` reads them. SIGTERM and
    SIGINT go to the child, which passes them to every rank; it waits for them up to the
    grace period (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, 30 s by default) before SIGKILL.
    """
    import signal
    import subprocess
    import tempfile

    from kubetune_trainer.preemption import GRACE_ENV

    with tempfile.TemporaryDirectory(prefix="kubetune-exit-") as codes:
        child_env = {**(os.environ if env is None else env), "KUBETUNE_EXIT_DIR": codes}
        grace = child_env.get(GRACE_ENV)
        if grace and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in child_env:
            child_env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(int(float(grace)))
        proc = subprocess.Popen(cmd, env=child_env)

        def forward(signum: int, _frame: object) -> None:
            proc.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        rc = proc.wait()
        ranks = {}
        for f in Path(codes).glob("rank-*"):
            try:
                ranks[f.name] = int(f.read_text())
            except (OSError, ValueError):
                continue
    code = exit_code(rc, list(ranks.values()))
    if code != rc:
        print(f"kubetune-launch: exit {code} (launcher {rc}, ranks "
              f"{dict(sorted(ranks.items())) or 'none reported'})", file=sys.stderr, flush=True)
    return code


def exit_code(launcher: int, ranks: list[int]) -> int:
    """The node's exit code from the launcher's and its ranks' (``kubetune.errors``): 2 when
    any rank found a permanent error; 0 when all went well; 143 when the ranks stopped on
    SIGTERM; otherwise retryable (a rank crashed or was killed: 200, or the signal's code)."""
    from kubetune.errors import EXIT_PERMANENT, EXIT_PREEMPTED, EXIT_RETRYABLE

    if EXIT_PERMANENT in ranks:
        return EXIT_PERMANENT
    if launcher == 0 and not any(ranks):
        return 0
    if EXIT_PREEMPTED in ranks and all(c in (0, EXIT_PREEMPTED) for c in ranks):
        return EXIT_PREEMPTED
    if launcher < 0:  # the launcher itself killed by a signal
        return 128 - launcher
    return launcher if launcher >= 128 else EXIT_RETRYABLE


if __name__ == "__main__":
    main()
