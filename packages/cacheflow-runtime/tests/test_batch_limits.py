"""vLLM's default batch limits by device: what ``default_batch_limits`` picks from the device's
memory and name (the CUDA properties faked, so that the CPU suite covers every branch)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cacheflow_runtime.config import BatchLimits, default_batch_limits

GIB = 1024**3


@pytest.mark.parametrize("name, memory, offline, serving", [
    ("NVIDIA H100 80GB HBM3", 79.2 * GIB, BatchLimits(1024, 16384), BatchLimits(1024, 8192)),
    ("NVIDIA H200", 139.8 * GIB, BatchLimits(1024, 16384), BatchLimits(1024, 8192)),
    ("NVIDIA A100-SXM4-80GB", 79.2 * GIB, BatchLimits(256, 8192), BatchLimits(256, 2048)),
    ("NVIDIA L4", 22.0 * GIB, BatchLimits(256, 8192), BatchLimits(256, 2048)),
    ("NVIDIA GeForce RTX 4090", 23.6 * GIB, BatchLimits(256, 8192), BatchLimits(256, 2048)),
])
def test_gpu_defaults_follow_memory_and_name(monkeypatch: pytest.MonkeyPatch, name: str,
                                             memory: float, offline: BatchLimits,
                                             serving: BatchLimits) -> None:
    asked = []

    def properties(device: torch.device) -> SimpleNamespace:
        asked.append(device)
        return SimpleNamespace(name=name, total_memory=int(memory))

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    device = torch.device("cuda:1")
    assert default_batch_limits(device) == offline
    assert default_batch_limits(device, serving=True) == serving
    assert asked == [device, device]  # the device asked about, not the current one


def test_cpu_keeps_the_small_limits() -> None:
    cpu = torch.device("cpu")
    assert default_batch_limits(cpu) == BatchLimits(256, 2048)
    assert default_batch_limits(cpu, serving=True) == BatchLimits(256, 2048)
