"""The machine's peaks, measured once, and where a decode step sits under them.

    peaks = measure_peaks(threads=(1, 2))   # {"1": {"gflops", "gops_int8", "gbs"}, "2": {...}}
    bound = roofline(bytes=70e6, flops=36e6, peak=peaks["2"])  # {"tok_s", "bound": "memory", ...}

Compute: the best of a few runs of one large fp32 GEMM (onnxruntime MatMul, 1024^3, 2.1 GFLOP)
with `threads` intra-op threads; `gops_int8` the same shape as MatMulInteger (u8 x s8, the VNNI
path int8 models use). Memory: a streaming copy of 256 MiB (numpy, one slice per thread; bytes
read + written), i.e. DRAM bandwidth, since the array is 8x larger than the L3. On a shared
machine these are lower bounds of the true peaks (noise only ever slows a run down): the best
run is kept.

A decode step reads every weight it uses once (batch 1), so its time is at least
max(bytes / bandwidth, flops / compute); `fraction` is measured tok/s over that bound.
"""

from __future__ import annotations

import threading
import time

import numpy as np


def _gemm_session(threads: int, n: int, integer: bool):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a_type, b_type = (TensorProto.UINT8, TensorProto.INT8) if integer else (TensorProto.FLOAT, TensorProto.FLOAT)
    out_type = TensorProto.INT32 if integer else TensorProto.FLOAT
    node = helper.make_node("MatMulInteger" if integer else "MatMul", ["a", "b"], ["y"])
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("a", a_type, [n, n]),
                                               helper.make_tensor_value_info("b", b_type, [n, n])],
                              [helper.make_tensor_value_info("y", out_type, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def gemm_gflops(threads: int, n: int = 1024, runs: int = 5, integer: bool = False) -> float:
    """Best GFLOP/s (or int8 GOP/s) of an n x n x n matrix product on `threads` threads."""
    rng = np.random.default_rng(0)
    if integer:
        a = rng.integers(0, 255, (n, n), dtype=np.uint8)
        b = rng.integers(-127, 127, (n, n), dtype=np.int8)
    else:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
    sess = _gemm_session(threads, n, integer)
    sess.run(None, {"a": a, "b": b})
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {"a": a, "b": b})
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def best_seconds(part, threads: int, runs: int) -> float:
    """Best wall time of `runs` runs of part(0) .. part(threads - 1), each on its own thread."""
    best = float("inf")
    for _ in range(runs):
        workers = [threading.Thread(target=part, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return best


def copy_gbs(threads: int, mib: int = 256, runs: int = 5) -> float:
    """Best GB/s (read + write) of a streaming copy of `mib` MiB split over `threads` threads."""
    n = mib * 2 ** 20 // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in

    def part(i: int) -> None:
        lo, hi = i * n // threads, (i + 1) * n // threads
        np.copyto(dst[lo:hi], src[lo:hi])  # numpy releases the GIL for plain copies

    return 2 * src.nbytes / best_seconds(part, threads, runs) / 1e9


def measure_peaks(threads=(1, 2), quick: bool = False) -> dict:
    """{str(threads): {"gflops", "gops_int8", "gbs"}} measured on this machine now."""
    runs = 3 if quick else 5
    out = {}
    for t in threads:
        out[str(t)] = {"gflops": gemm_gflops(t, runs=runs), "gops_int8": gemm_gflops(t, runs=runs, integer=True),
                       "gbs": copy_gbs(t, mib=128 if quick else 256, runs=runs)}
    return out


def roofline(bytes: float, flops: float, peak: dict, integer: bool = False) -> dict:
    """Upper bound of decode tok/s for a step that moves `bytes` and does `flops`."""
    t_mem = bytes / (peak["gbs"] * 1e9)
    compute = peak["gops_int8"] if integer else peak["gflops"]
    t_flop = flops / (compute * 1e9)
    return {"tok_s": 1 / max(t_mem, t_flop), "bound": "memory" if t_mem >= t_flop else "compute",
            "intensity": flops / bytes if bytes else 0.0, "t_mem_ms": t_mem * 1e3, "t_flop_ms": t_flop * 1e3}
