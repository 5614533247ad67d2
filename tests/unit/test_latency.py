"""Latency measurement protocol."""

import time

import pytest
import torch

from supervit import SubnetConfig, SuperViT, default_latency_mode, get_arch, hardware_fingerprint, measure_latency


def test_measure_latency_reports_median_spread_and_hardware():
    model = SuperViT(get_arch("tiny"), num_classes=10)
    threads = torch.get_num_threads()
    r = measure_latency(model, SubnetConfig(8, 1.0), batch_size=4, warmup=2, runs=9, threads=1, mode="eager")
    assert r.mode == "eager" and r.compile_s == 0.0
    assert r.runs == 9 and r.batch_size == 4 and r.dtype == "float32" and r.threads == 1 and r.device == "cpu"
    assert 0 < r.p10_ms <= r.median_ms <= r.p90_ms and r.iqr_ms >= 0
    assert torch.get_num_threads() == threads  # restored
    fp, text = hardware_fingerprint("cpu", 1)
    assert r.fingerprint == fp and r.hardware == text and "torch" in text
    assert hardware_fingerprint("cpu", 2)[0] != fp  # thread count is part of the hardware


def test_min_time_extends_runs_and_cuda_is_checked():
    model = SuperViT(get_arch("tiny"), num_classes=10)
    start = time.perf_counter()
    r = measure_latency(model, None, batch_size=1, warmup=1, runs=2, min_time_s=0.2, mode="eager")
    # It kept timing until min_time_s had passed: far more than 2 runs, and most of those 0.2 s in them (the sum
    # of the timed forwards alone falls a little short: the loop's own steps between them count too).
    assert time.perf_counter() - start >= 0.2
    assert r.runs > 10 and r.mean_ms * r.runs >= 100
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            measure_latency(model, None, device="cuda", mode="eager")


def test_the_default_mode_is_what_a_deployment_runs():
    assert default_latency_mode("cpu") == "compiled" and default_latency_mode("cuda") == "compiled"
