"""Decode step: onnxruntime's sequential executor with 2 intra-op threads vs its parallel executor.

    python studies/perf/executor.py /tmp/r/17m-int8 /tmp/r/54m-int8

The parallel executor (inter-op threads) could run a layer's independent branches at once (the
shared experts beside routing + QMoE). Each folder is loaded three times (sequential with 2
intra-op threads, as `perseus run -t 2`; parallel with 2 inter-op threads and 1 or 2 intra-op),
16 tokens prefilled, then 7 interleaved rounds of 64 one-token steps (median, ms). Measured in
studies/perf/README.md, section 8.
"""
import sys, time, json
import numpy as np, onnxruntime as ort
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from perseus_edge.runtime.model import Model

folders = sys.argv[1:]
variants = {
    "seq intra2": dict(mode="seq", intra=2, inter=1),
    "par inter2 intra1": dict(mode="par", intra=1, inter=2),
    "par inter2 intra2": dict(mode="par", intra=2, inter=2),
}

def make(folder, v):
    m = Model(folder, threads=v["intra"], verify=False)
    if v["mode"] == "par":
        # rebuild the session with the parallel executor, same config otherwise
        so = ort.SessionOptions()
        so.intra_op_num_threads = v["intra"]; so.inter_op_num_threads = v["inter"]
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        so.add_session_config_entry("session.inter_op.allow_spinning", "1")
        so.log_severity_level = 3
        m.session = ort.InferenceSession(str(m.folder.graph), so, providers=["CPUExecutionProvider"])
        from perseus_edge.runtime.cache import KVCache
        m.cache = KVCache(m.spec.caches, m.spec.max_context, 1); m._rows = {}; m._all = m._bound(0, 1)
    ids = (np.arange(16) * 7919 % m.spec.vocab_size)[None]
    m.forward(ids, 0, last_only=True)
    return m

for folder in folders:
    ms = {k: make(folder, v) for k, v in variants.items()}
    tok = np.array([[7]])
    res = {k: [] for k in ms}
    for rnd in range(7):
        for k, m in ms.items():
            ts = []
            for i in range(64):
                t0 = time.perf_counter(); m.forward(tok, 16 + i); ts.append(time.perf_counter() - t0)
            res[k].append(np.median(ts))
    base = np.median(res["seq intra2"])
    print(folder, {k: f"{np.median(v)*1e3:.3f} ms ({base/np.median(v):.2f}x)" for k, v in res.items()})
