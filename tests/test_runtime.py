"""unirag.runtime: cores from the cgroup quota (fake cgroup v1/v2 files), the torch device, the ZeroGPU decorator."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from unirag import runtime


def _v2(root: Path, cpu_max: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def _v1(root: Path, quota: int, period: int) -> Path:
    (root / "cpu").mkdir(parents=True, exist_ok=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


@pytest.fixture
def many_cores(monkeypatch):
    """A host that reports 16 cores (affinity and cpu_count), as a 2-vCPU Space container can."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)


@pytest.mark.parametrize(("cpu_max", "limit"), [("200000 100000", 2.0), ("150000 100000", 1.5), ("50000 100000", 0.5),
                                                ("max 100000", None)])
def test_cgroup_v2_quota(tmp_path, cpu_max, limit):
    assert runtime.cgroup_cpu_limit(_v2(tmp_path, cpu_max)) == limit


@pytest.mark.parametrize(("quota", "period", "limit"), [(200000, 100000, 2.0), (-1, 100000, None), (0, 100000, None)])
def test_cgroup_v1_quota(tmp_path, quota, period, limit):
    assert runtime.cgroup_cpu_limit(_v1(tmp_path, quota, period)) == limit


def test_no_cgroup_or_garbage_means_unlimited(tmp_path):
    assert runtime.cgroup_cpu_limit(tmp_path / "missing") is None
    assert runtime.cgroup_cpu_limit(_v2(tmp_path / "bad", "lots 100000")) is None
    assert runtime.cgroup_cpu_limit(_v2(tmp_path / "zero", "200000 0")) is None


def test_usable_cpus_is_the_quota_not_the_hosts_cores(tmp_path, many_cores):
    assert runtime.usable_cpus(_v2(tmp_path / "v2", "200000 100000")) == 2
    assert runtime.usable_cpus(_v1(tmp_path / "v1", 400000, 100000)) == 4
    assert runtime.usable_cpus(_v2(tmp_path / "half", "50000 100000")) == 1  # a fraction rounds up, never 0
    assert runtime.usable_cpus(_v2(tmp_path / "frac", "150000 100000")) == 2
    assert runtime.usable_cpus(tmp_path / "none") == 16  # no quota: the affinity mask


def test_usable_cpus_takes_the_smaller_of_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert runtime.usable_cpus(_v2(tmp_path, "800000 100000")) == 2


@pytest.mark.parametrize(("cpus", "parallel", "threads"), [(1, True, 1), (2, True, 1), (2, False, 1), (3, True, 1),
                                                           (3, False, 2), (5, True, 2), (16, False, 15)])
def test_torch_threads_leave_a_core_for_the_server_and_split_between_sides(tmp_path, monkeypatch, cpus, parallel,
                                                                           threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    root = _v2(tmp_path, f"{cpus * 100000} 100000")
    assert runtime.torch_threads(parallel, root) == threads


@pytest.mark.parametrize(("cpus", "workers"), [(1, 1), (2, 1), (3, 1), (4, 2), (16, 2)])
def test_a_second_question_worker_only_where_the_cores_are(tmp_path, monkeypatch, cpus, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert runtime.question_workers(_v2(tmp_path, f"{cpus * 100000} 100000")) == workers


def test_device_follows_cuda_availability(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.device() == "cpu"


def test_app_config_places_models_on_the_runtime_device(monkeypatch):
    import torch

    from unirag.pipeline import AppConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert AppConfig().device == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert AppConfig().device == "cpu"


# --- ZeroGPU ----------------------------------------------------------------------------------------------------
def _fake_spaces(monkeypatch) -> list[int]:
    """A stand-in `spaces` module whose GPU(duration=...) records the duration and marks the function."""
    calls: list[int] = []
    module = types.ModuleType("spaces")

    def gpu(duration: int = 60):
        calls.append(duration)

        def wrap(fn):
            def on_gpu(*args, **kwargs):
                return ("on gpu", fn(*args, **kwargs))

            return on_gpu

        return wrap

    module.GPU = gpu
    monkeypatch.setitem(sys.modules, "spaces", module)
    return calls


def test_gpu_function_is_a_no_op_off_zero_gpu(monkeypatch):
    calls = _fake_spaces(monkeypatch)  # even with `spaces` importable: not on ZeroGPU
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)

    def answer(x):
        return x + 1

    assert runtime.gpu_function(30)(answer) is answer
    assert calls == []


def test_gpu_function_uses_spaces_gpu_on_zero_gpu(monkeypatch):
    calls = _fake_spaces(monkeypatch)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert runtime.on_zero_gpu()
    wrapped = runtime.gpu_function(90)(lambda x: x + 1)
    assert calls == [90]
    assert wrapped(1) == ("on gpu", 2)


def test_device_is_cuda_on_zero_gpu_even_before_a_gpu_is_attached(monkeypatch):
    import torch

    _fake_spaces(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # ZeroGPU outside a decorated call
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert runtime.device() == "cuda"
    monkeypatch.delenv("SPACES_ZERO_GPU")
    assert runtime.device() == "cpu"


def test_gpu_function_without_spaces_installed_is_a_no_op(monkeypatch):
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    monkeypatch.setitem(sys.modules, "spaces", None)  # `import spaces` raises ImportError

    def answer():
        return 1

    assert runtime.gpu_function(30)(answer) is answer


def test_pipeline_answers_both_sides_in_one_gpu_call(monkeypatch):
    """Pipeline.ask goes through `answer_on_device` once per question, the function ZeroGPU decorates."""
    from unirag import pipeline as pipeline_module
    from unirag.pipeline import AppConfig, Pipeline

    calls = []
    pipe = Pipeline(AppConfig(device="cpu"))
    bundle = types.SimpleNamespace(name="nq", settings=types.SimpleNamespace(replace=lambda **c: "settings"),
                                   baseline_default="rag")
    monkeypatch.setattr(pipe, "bundle", lambda name: bundle)
    monkeypatch.setattr(pipeline_module, "answer_on_device",
                        lambda p, b, t, s, baseline: calls.append((p, b, t, s, baseline)) or "both")
    assert pipe.ask("nq", "  who wrote it? ") == "both"
    assert calls == [(pipe, bundle, "who wrote it?", "settings", "rag")]


def test_all_cores_lends_every_usable_core_for_the_block_then_restores(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(runtime, "usable_cpus", lambda root=runtime.CGROUP: 2)
    serving = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with runtime.all_cores() as cores:
            assert cores == 2 and torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        with pytest.raises(RuntimeError), runtime.all_cores():
            raise RuntimeError("a failed load")
        assert torch.get_num_threads() == 1  # restored after a failure too
    finally:
        torch.set_num_threads(serving)
