"""Timing on the device the work runs on, and the matrix-multiply peak to compare with."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    On CUDA each call is bracketed by CUDA events (kernels run asynchronously,
    so a host clock would measure the launch, not the work); elsewhere by the
    host clock. ``warmup`` calls first keep compilation and caches out of it.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def graph_time_ms(fn: Callable[[], object], device: torch.device, *, repeats: int = 20) -> float | None:
    """Median GPU time of ``fn()`` replayed from a CUDA graph, in milliseconds.

    A graph replays the kernels without the host work that launches them, so
    this is the time the GPU needs; ``time_ms`` minus this is launch overhead,
    which inside a model overlaps with the kernels of other layers. ``fn`` must
    have run before (compilation, caches). None where capture is not possible
    (no CUDA, or an operation that cannot be captured).
    """
    if device.type != "cuda":
        return None
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up on the capture stream, as CUDA graphs require
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # capture refused: report no graph time rather than fail the benchmark
        torch.cuda.synchronize(device)
        return None
    ms = time_ms(graph.replay, device, warmup=2, repeats=repeats)
    del graph
    return ms


def time_wall_s(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, repeats: int = 3) -> float:
    """Median seconds of ``fn()`` including host work (for whole evaluation loops)."""
    for _ in range(warmup):
        fn()
    return statistics.median(wall_s(fn, device) for _ in range(repeats))


def wall_s(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one ``fn()`` call, host work included, the device's queue drained before and after."""
    synchronize(device)
    begin = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - begin


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192,
                       repeats: int = 10) -> float:
    """TFLOP/s of one size x size x size matrix product on random data (the reachable peak)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    ms = time_ms(lambda: a @ b, device, warmup=3, repeats=repeats)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def sustained_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, size: int = 8192,
                            seconds: float = 6.0) -> float | None:
    """TFLOP/s of size^3 matrix products run back to back for ``seconds``, over the
    second half of that time. A GPU at its power limit lowers its clock after a
    few seconds of dense matrix work (benchmarks/README.md has a measured case),
    so this is the rate a long evaluation can reach, below the burst peak of
    ``matmul_peak_tflops``. None off CUDA."""
    if device.type != "cuda":
        return None
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    per_batch = 10
    rates, begin = [], time.perf_counter()
    while time.perf_counter() - begin < seconds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_batch):
            a @ b
        end.record()
        end.synchronize()
        rates.append((time.perf_counter() - begin, per_batch * 2 * size**3 / (start.elapsed_time(end) * 1e-3) / 1e12))
    late = [rate for at, rate in rates if at >= seconds / 2] or [rates[-1][1]]
    return statistics.median(late)
