"""How many devices of the detected kind this node has, for the launcher.

A failure to count is reported as an error naming the device kind and the cause. (The old bash launcher
turned any failure into "1 device", so a broken driver silently became a 1-device run labelled 8p.)

On CPU the "devices" are the cores this process may use: each training process needs at least one, so
``--num_devices=2`` on a 2-core machine runs two processes and ``--num_devices=8`` is cut to two.
"""
from __future__ import annotations

import os
from typing import Tuple

from ..errors import DiffusersNpuError


class DeviceCountError(DiffusersNpuError):
    """The device kind or the number of devices on this node cannot be determined."""


def usable_cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset / cgroup cpusets, unlike os.cpu_count()
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def count_devices() -> Tuple[str, int]:
    """``(kind, count)`` for this node: kind is ``npu``, ``cuda`` or ``cpu`` (see :func:`device.detect_device`,
    which honours ``$DIFFUSERS_NPU_DEVICE``)."""
    from .. import device

    try:
        kind = device.detect_device()
    except (RuntimeError, ValueError) as exc:
        raise DeviceCountError(f"cannot choose the device to launch on: {exc}") from None
    if kind == "cpu":
        return kind, usable_cpu_cores()
    try:
        if kind == "cuda":
            import torch

            count = int(torch.cuda.device_count())
        else:
            # torch.npu exists only once torch_npu is imported, and device.py is the one place that imports it.
            if device.get_torch_npu() is None:
                raise RuntimeError("torch_npu cannot be imported")
            import torch

            count = int(torch.npu.device_count())
    except Exception as exc:  # driver / runtime failures come as many exception types
        raise DeviceCountError(f"cannot count the {kind} devices on this node: {type(exc).__name__}: {exc} "
                               f"(check the driver with npu-smi / nvidia-smi)") from None
    if count < 1:
        raise DeviceCountError(f"the {kind} runtime reports {count} devices on this node; check "
                               f"ASCEND_RT_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES and the driver")
    return kind, count


__all__ = ["DeviceCountError", "count_devices", "usable_cpu_cores"]
