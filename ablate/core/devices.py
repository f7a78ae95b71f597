"""Where a study's workers run: how many processes, on which device, with how many torch threads.

``workers: auto`` (the study file or ``--workers auto``) follows one rule:
- **CPU only**: one worker per core, one thread each. A small model's step is compute-bound on a CPU (a 6x larger
  batch costs 6x the time at one thread, 1.3x less at two), so separate single-thread trials use the cores best.
- **CUDA**: every GPU of the machine gets workers; on each, as many as fit in ``GPU_MEMORY_SHARE`` of its free memory
  by the preflight's estimate of one run (``preflight.estimate_bytes``, which errs high), at least one and at most
  ``MAX_PER_GPU``: a small model's step is launch-bound on a GPU, so trials side by side fill the idle time.
A number of workers is taken as given: on a GPU machine they are dealt round-robin over the devices.
Each GPU worker sees only its own device (``CUDA_VISIBLE_DEVICES``, set for its process alone).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

AUTO = "auto"
MAX_PER_GPU = 8
GPU_MEMORY_SHARE = 0.8  # of a device's free memory: the CUDA context and allocator caches need the rest


@dataclass(frozen=True)
class Slot:
    """One worker process: its device ("cpu", or a CUDA device index as CUDA_VISIBLE_DEVICES names it) and threads."""

    device: str
    threads: int


def plan_slots(workers: int | str, run_bytes: int, gpu_free: list[int], cpu_count: int,
               threads: int | None = None) -> list[Slot]:  # fmt: skip
    """The worker processes for ``workers`` (a number, or ``auto``) on a machine with ``cpu_count`` cores and GPUs
    with ``gpu_free`` bytes free each (empty: none); ``threads`` (``train.threads``) overrides the split of cores."""
    cores = max(1, cpu_count)
    if not gpu_free:
        n = cores if workers == AUTO else int(workers)
        return [Slot("cpu", threads or max(1, cores // n))] * n
    if workers == AUTO:
        per_gpu = [max(1, min(MAX_PER_GPU, int(GPU_MEMORY_SHARE * free) // max(1, run_bytes))) for free in gpu_free]
        slots = [str(i) for i, k in enumerate(per_gpu) for _ in range(k)]
    else:
        slots = [str(i % len(gpu_free)) for i in range(int(workers))]
    return [Slot(device, threads or max(1, cores // len(slots))) for device in slots]


def usable_cores(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use, not the machine's: its CPU affinity (Slurm's or taskset's binding), at most
    ``SLURM_CPUS_PER_TASK`` (a Slurm allocation without binding) and at most its cgroup's CPU quota (a Kubernetes
    or Docker CPU limit, rounded up)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if (per_task := os.environ.get("SLURM_CPUS_PER_TASK", "")).isdigit() and int(per_task) > 0:
        cores = min(cores, int(per_task))
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit here
    return max(1, cores)


def gpu_free_bytes() -> list[int]:
    """Free memory of each CUDA device of this machine (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
