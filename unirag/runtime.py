"""The machine the app runs on: usable CPU cores (cgroup quota, not the host's), the torch device, ZeroGPU.

`os.cpu_count()` reports the host's cores inside a container (a 2-vCPU Space can report 16), so torch would
start one thread per host core and oversubscribe the quota. The usable count is the smallest of the CPU
affinity mask and the cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """CPUs allowed by the cgroup quota (e.g. 2.0), or None when unlimited or not in a cgroup."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
        if quota != "max" and int(period) > 0:
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(root: Path = CGROUP) -> int:
    """Cores this process may use: affinity mask and cgroup quota, whichever is smaller (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)


def torch_threads(parallel_sides: bool, root: Path = CGROUP) -> int:
    """Threads per torch side: one core is left to the web server, the rest split between sides run at once."""
    spare = max(1, usable_cpus(root) - 1)
    return max(1, spare // (2 if parallel_sides else 1))


@contextmanager
def all_cores(root: Path = CGROUP) -> Iterator[int]:
    """Torch uses every usable core inside the block (a start-up load: nothing is answering yet, and quantising
    and converting weights is compute-bound), then the serving thread count again."""
    import torch

    serving = torch.get_num_threads()
    cores = usable_cpus(root)
    torch.set_num_threads(max(cores, serving))
    try:
        yield cores
    finally:
        torch.set_num_threads(serving)


def question_workers(root: Path = CGROUP) -> int:
    """Model requests the app runs at once besides asks (re-asks, corpus loads, Your passages; concurrent asks are
    batched instead, `unirag.batching`). Each model runs one forward pass at a time (its retrieval side channel
    is per call) and one request already keeps both sides busy, so on 2 cores a second worker only queues behind
    the first; from 4 cores on, a second request's one side can run while the first's other side finishes."""
    return 2 if usable_cpus(root) >= 4 else 1


def device() -> str:
    """"cuda" on a GPU Space and on ZeroGPU (models go to cuda at load time there; `spaces` emulates it until a
    decorated call holds a real GPU), else "cpu"."""
    if zero_gpu_spaces() is not None:
        return "cuda"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def on_zero_gpu() -> bool:
    """ZeroGPU Spaces set SPACES_ZERO_GPU."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def zero_gpu_spaces() -> Any:
    """The `spaces` package on a ZeroGPU Space (preinstalled there), else None (not on ZeroGPU, or not installed)."""
    if not on_zero_gpu():
        return None
    try:
        import spaces
    except ImportError:
        return None
    return spaces


def gpu_function(duration: int = 60) -> Callable[[F], F]:
    """`spaces.GPU(duration=...)` on a ZeroGPU Space (the GPU is attached only inside the call), a no-op elsewhere.
    Applied at import time, as ZeroGPU requires, which also imports `spaces` before any model is loaded."""
    spaces = zero_gpu_spaces()
    if spaces is not None:
        return spaces.GPU(duration=duration)
    return lambda fn: fn


__all__ = ["all_cores", "cgroup_cpu_limit", "device", "gpu_function", "on_zero_gpu", "question_workers",
           "torch_threads", "usable_cpus", "zero_gpu_spaces"]
