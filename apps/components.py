"""TorchX components of the MEC apps.

Here (2 local processes, gloo on CPU)::

    torchx run -s local_cwd apps/components.py:dlrm_mec --spec specs/synthetic.yaml --out DIR -j 1x2

On a cluster (N hosts x 8 GPUs, nccl; see docs/app.md)::

    torchx run -s slurm apps/components.py:dlrm_mec --spec specs/criteo_kaggle.yaml \\
        --out /shared/runs/kaggle -j 2x8 --gpu 8 --cpu 64 --memMB 480000

The component is ``torchx.components.dist.ddp`` running ``python -m apps.dlrm.main``: torchrun on
every host, c10d rendezvous on the first one. Paths (spec, out, the data the spec names) must be
visible to every host (a shared filesystem, or ``--mounts`` with a container image).

Retries (``--max_retries N``): torchx's ``dist.ddp`` only hands ``max_retries`` to the scheduler,
and the local schedulers (``local_cwd``, ``local_docker``) do not retry at all. So this component
also gives torchrun ``--max-restarts N``: when a worker dies, torchrun's elastic agent stops the
other workers of its host and restarts them all (``TORCHELASTIC_RESTART_COUNT`` counts the
attempts), on every scheduler. A restarted attempt resumes from the checkpoints (the app reads
the counter). Each attempt gets a fresh rendezvous store (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE``
is set): with the agent's store shared, restarted gloo ranks hang connecting to the dead ones.
Schedulers that resubmit failed replicas (Slurm, Kubernetes) retry up to N times more when a
whole host or its agent fails; pass ``--resume True`` for those attempts to resume.
"""

# torchx parses component signatures from the source (file_linter) and understands only
# typing.Optional / Dict / List there, not PEP 604 unions or builtin generics.
# ruff: noqa: UP006, UP035, UP045
from typing import Dict, List, Optional

import torchx
from torchx import specs
from torchx.components import dist


def dlrm_mec(
    spec: str = "specs/synthetic.yaml",
    out: str = "out/synthetic",
    stage: str = "all",
    resume: bool = False,
    j: str = "1x2",
    image: str = torchx.IMAGE,
    name: str = "/dlrm_mec",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """DLRM + MEC (pretrain -> compress -> train) on ``j`` = {hosts}x{processes per host}.

    Args:
        spec: job spec (YAML), e.g. specs/synthetic.yaml or specs/criteo_kaggle.yaml
        out: output folder: checkpoints, compressed tables, report.json, plots
        stage: pretrain, compress, train or all
        resume: continue from the checkpoints and finished stages in ``out`` (``--resume True``)
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 here, 2x8 on two 8-GPU hosts
        image: container image (schedulers that run images); the working dir for local_cwd
        name: job name
        cpu: CPUs per host
        gpu: GPUs per host (processes use nccl and one GPU each when CUDA is available)
        memMB: host memory in MB
        h: a registered named resource (overrides cpu, gpu, memMB)
        env: extra environment variables, e.g. NCCL_DEBUG=INFO
        max_retries: restarts after a failed worker (torchrun ``--max-restarts``; they resume)
            and scheduler retries of a failed host (combine with ``resume`` for those)
        rdzv_port: c10d rendezvous port on the first host (multi-host only)
        mounts: mounts for container schedulers (type=bind,src=/data,dst=/data)
    """
    if stage not in ("pretrain", "compress", "train", "all"):
        raise ValueError(f"stage must be pretrain, compress, train or all, got {stage!r}")
    args = ["--spec", spec, "--out", out, "--stage", stage]
    if resume:
        args.append("--resume")
    env = dict(env or {})
    if max_retries:
        # A fresh rendezvous store per attempt: with the agent's store shared (torch's default),
        # restarted gloo ranks read the dead attempt's addresses and hang (pytorch#135712).
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    app = dist.ddp(
        *args,
        m="apps.dlrm.main",
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
    if max_retries:
        role = app.roles[0]
        command = role.args[1]
        if role.args[0] != "-c" or not command.startswith("torchrun "):
            raise RuntimeError(
                f"unexpected torchx ddp command, cannot add --max-restarts: {command}"
            )
        role.args[1] = f"torchrun --max-restarts {max_retries} {command[len('torchrun ') :]}"
    return app
