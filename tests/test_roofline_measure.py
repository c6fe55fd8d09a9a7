"""Tests of the micro-benchmarks that measure this machine's roofline ceilings (small sizes: fast)."""

from __future__ import annotations

import math

import pytest
import torch

from refimpl.roofline import Hardware, load_hardware, measure, measure_hardware


def test_time_fn_calls_warmup_plus_repeats_and_returns_the_minimum():
    calls = []
    seconds = measure.time_fn(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6
    assert 0 <= seconds < 0.1


def test_stream_bandwidth_and_matmul_flops_are_positive_and_finite():
    bw = measure.stream_bandwidth(4 * 2**20, repeats=2)
    flops = measure.matmul_flops(64, repeats=2)
    assert 1e8 < bw < 1e13 and math.isfinite(bw)  # any machine this runs on: 0.1 GB/s .. 10 TB/s
    assert 1e6 < flops < 1e15 and math.isfinite(flops)
    assert measure.matmul_flops(32, "bf16", repeats=1) > 0
    assert measure.matmul_flops(32, torch.float64, repeats=1) > 0


def test_measured_hardware():
    hw = measure_hardware(matmul_sizes=(64, 128), stream_nbytes=2**20, repeats=2)
    assert isinstance(hw, Hardware) and hw.measured and hw.host_link_bandwidth is None
    assert hw.dtypes == ["fp32"] and hw.peak("fp32") > 0 and hw.memory_bandwidth > 0
    assert hw.memory_capacity > 2**28  # at least 256 MiB of RAM
    assert "matmul" in hw.source and hw.date
    hw2, sweep = measure_hardware(matmul_sizes=(32, 64), stream_nbytes=2**16, repeats=1, return_sweep=True)
    assert set(sweep) == {"fp32"} and set(sweep["fp32"]) == {32, 64}
    assert hw2.peak("fp32") == max(sweep["fp32"].values())  # the best point of the sweep is the ceiling
    # the "cpu" entry is measured once per process and cached
    assert load_hardware("cpu") is load_hardware("cpu")


@pytest.mark.parametrize("kernel", measure.READ_KERNELS)
def test_read_stream_counts_bytes_by_the_operator_convention(kernel):
    """Inputs read once, output written once, as every operator of refimpl.roofline.ops; the kernel computes."""
    op, fn = measure.read_stream(2**20, kernel)
    n = 2**20 // 4
    if kernel == "sum":
        assert (op.bytes_read, op.bytes_written) == (4 * n, 4)
        assert float(fn()) == n  # the sum of n ones
    else:
        rows = n // 4096
        assert (op.bytes_read, op.bytes_written) == (4 * (n + 4096), 4 * rows)
        assert torch.equal(fn(), torch.full((rows,), 4096.0))  # each row of ones times a vector of ones
    assert op.bytes_read > 100 * op.bytes_written, "a read-dominated stream"


def test_read_bandwidth_and_measure_operators():
    bw = measure.read_bandwidth((2**20, 2**21), repeats=2)
    assert 1e8 < bw < 1e13
    hw = measure_hardware(matmul_sizes=(64,), stream_nbytes=2**20, repeats=2)
    assert "read" in hw.source and "copy" not in hw.source  # the ceiling is a read stream, not a copy
    a, b = torch.ones(2**16), torch.ones(2**16)
    op = measure.read_stream(2**18)[0]
    bw2, points = measure.measure_operators(
        {"dot": (op, lambda: torch.dot(a, b))}, hw.memory_bandwidth, read_sizes=(2**20,), repeats=2, warmup=0
    )
    assert set(points) == {"dot"} and points["dot"][0] == op.intensity and points["dot"][1] > 0
    assert bw2 >= hw.memory_bandwidth
    w = [torch.ones(8, 16), torch.ones(16, 4)]
    assert 0 < measure.matvec_time(w, repeats=2) < 1.0
    with pytest.raises(ValueError, match="kernel"):
        measure.read_stream(2**20, "copy")
    with pytest.raises(ValueError, match="nbytes must be >= 16384"):
        measure.read_stream(8)
    with pytest.raises(ValueError, match="sizes and kernels"):
        measure.read_bandwidth(())
    with pytest.raises(ValueError, match="kernels must name"):
        measure.measure_operators({}, hw.memory_bandwidth)
    with pytest.raises(ValueError, match="weights must hold"):
        measure.matvec_time([])
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        measure.matvec_time([torch.ones(3)])


def test_bad_inputs():
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        measure.time_fn(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        measure.time_fn(lambda: None, warmup=-1)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        measure.matmul_flops(0)
    with pytest.raises(ValueError, match="nbytes must be >= 4"):
        measure.stream_bandwidth(2)
    with pytest.raises(ValueError, match="for a measurement"):
        measure.matmul_flops(8, "int4")
    with pytest.raises(ValueError, match="matmul_sizes must name at least one size"):
        measure_hardware(matmul_sizes=())


def test_decode_layer_time_runs_the_model_shapes():
    from refimpl.roofline import ModelConfig

    tiny = ModelConfig("tiny", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, vocab_size=10)
    assert 0 < measure.decode_layer_time(tiny, batch=3, context=8, repeats=1, warmup=0) < 1.0
    with pytest.raises(ValueError, match="model must be dense"):
        measure.decode_layer_time("mixtral-8x7b", batch=1, context=8)
    with pytest.raises(ValueError, match="context must be >= 1"):
        measure.decode_layer_time(tiny, batch=1, context=0)


def _bench_lines(run_benchmark, argv):
    status, lines = run_benchmark("bench_roofline", argv)
    assert status == 0
    return lines


def test_benchmark_quick_prints_numeric_lines(run_benchmark):
    lines = _bench_lines(run_benchmark, ["--quick"])
    for key in [
        "stream_bandwidth_gbps",
        "matmul_gflops_fp32",
        "ridge_point_flop_per_byte",
        "gemm_over_gemv_flops_ratio",
        "gemv_bandwidth_fraction",
        "add_bandwidth_fraction",
        "smollm2_decode_layer_measured_over_predicted",
    ]:
        assert math.isfinite(float(lines[key])) and float(lines[key]) > 0, key
    sweep = _bench_lines(run_benchmark, ["--quick", "--decode-sweep"])
    assert [k for k in sweep if k.startswith("decode_layer_ms_b")] == [f"decode_layer_ms_b{b}" for b in (1, 2, 4)]
    assert all(float(v) > 0 for v in sweep.values())
