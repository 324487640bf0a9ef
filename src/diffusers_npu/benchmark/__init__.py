"""Benchmark harnesses behind ``bench/train_throughput.py`` and ``bench/infer_throughput.py``.

The scripts in ``bench/`` only call :func:`diffusers_npu.benchmark.train.cli` (around
:func:`~diffusers_npu.benchmark.train.main`) and :func:`diffusers_npu.benchmark.infer.main`, so tests import
and run exactly what the scripts run. Results, commands and recipes live in ``bench/RESULTS.md``.
"""
