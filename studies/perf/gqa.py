"""Latent attention at decode: the perseus body vs onnxruntime's GroupQueryAttention, L layers.

    python studies/perf/gqa.py 8 32 16 128 32 1024 8 16 1     # H nope rope r v C L context threads

The candidate of issue 13 for fewer kernels per step: absorbed MLA as GroupQueryAttention with one
KV head over a merged [k_rope | c_kv] cache (past_key and past_value bound to the same buffer,
keys = values, the rope columns of the output dropped before W_UV). Builds two graphs of L
sequential layers with random weights (the perseus.LatentAttention function as exported, and a
GQA body), fills `context` rows one token at a time, checks that both give the same output, then
times one-token steps in 7 interleaved rounds (median step, us). Only the attention: no
projections, norms or experts. Measured in studies/perf/README.md, section 8.
"""
import sys, time
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, numpy_helper, TensorProto as TP
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from perseus_edge.export import ops
from perseus_edge.modelfile.graph import Builder, Ref, OPSET, IR_VERSION
from onnx import AttributeProto
INT = AttributeProto.INT

H, NOPE, ROPE, R, V, C, L = [int(x) for x in sys.argv[1:8]]
CTX = int(sys.argv[8]); THREADS = int(sys.argv[9])
rng = np.random.default_rng(0)

def gqa_function():
    b = Builder()
    heads = Ref("num_heads", INT)
    c = b.RMSNormalization("c_kv", "kv_norm", axis=-1, epsilon=Ref("epsilon"))
    kr = b.RotaryEmbedding("k_rope", "cos_cache", "sin_cache", "position_ids", num_heads=1)
    qr = b.RotaryEmbedding("q_rope", "cos_cache", "sin_cache", "position_ids", num_heads=heads)
    key = b.Concat(kr, c, axis=-1)
    qn = b.Reshape("q_nope", b.const([0, 0, H, 1, NOPE]))
    ql = b.MatMul(qn, "w_uk")
    q = b.Reshape(b.Concat(b.Reshape(qr, b.const([0, 0, H, 1, ROPE])), ql, axis=-1), b.const([0, 0, -1]))
    last = b.Gather("position_ids", b.const(-1), axis=1)  # [B]
    seqlens = b.Cast(last, to=TP.INT32)
    total = b.Cast(b.Add(b.ReduceMax(last, keepdims=0), b.const(1)), to=TP.INT32)
    out, _, _ = b.op("GroupQueryAttention", q, key, key, "past", "past", seqlens, total, _domain="com.microsoft",
                     _outputs=["attn", "present", "present_v"], num_heads=H, kv_num_heads=1, scale=Ref("scale"))
    lat = b.Slice(b.Reshape(out, b.const([0, 0, H, 1, ROPE + R])), b.const([ROPE]), b.const([ROPE + R]), b.const([-1]))
    b.Reshape(b.MatMul(lat, "w_uv"), b.const([0, 0, -1]), _outputs=["out"])
    f = b.function("perseus", "LatentAttentionGQA",
                   ["q_nope", "q_rope", "c_kv", "k_rope", "position_ids", "cos_cache", "sin_cache", "past",
                    "kv_norm", "w_uk", "w_uv"], ["out", "present", "present_v"], ["num_heads", "scale", "epsilon"], "")
    f.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return f

def build(kind):
    rng = np.random.default_rng(0)
    b = Builder()
    inits = {}
    def w(name, arr):
        inits[name] = arr.astype(np.float32); return name
    inputs = [helper.make_tensor_value_info("position", TP.INT64, ["batch"]),
              helper.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq", H * NOPE])]
    outputs = []
    pos = b.Unsqueeze("position", b.const([1]), _name="position_ids")
    x = "x"
    inv = 1.0 / (10000 ** (np.arange(0, ROPE, 2) / ROPE)); t = np.arange(C)[:, None] * inv[None]
    cos, sin = w("cos", np.cos(t)), w("sin", np.sin(t))
    for i in range(L):
        qr = w(f"qr{i}", rng.standard_normal((1, 1, H * ROPE)))
        ck = w(f"ck{i}", rng.standard_normal((1, 1, R)))
        kr = w(f"kr{i}", rng.standard_normal((1, 1, ROPE)))
        norm = w(f"n{i}", np.ones(R))
        wuk = w(f"wuk{i}", rng.standard_normal((H, NOPE, R)) * 0.1)
        wuv = w(f"wuv{i}", rng.standard_normal((H, R, V)) * 0.1)
        if kind == "cur":
            for slot, width in (("c", R), ("k", ROPE)):
                inputs.append(helper.make_tensor_value_info(f"past.{i}.{slot}", TP.FLOAT, ["batch", C, width]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{slot}", TP.FLOAT, ["batch", C, width]))
            out, _, _ = b.op("LatentAttention", x, qr, ck, kr, pos, cos, sin, f"past.{i}.c", f"past.{i}.k", norm, wuk, wuv,
                             _domain="perseus", _outputs=[f"o{i}", f"present.{i}.c", f"present.{i}.k"],
                             num_heads=H, scale=0.1, epsilon=1e-6)
        else:
            inputs.append(helper.make_tensor_value_info(f"past.{i}.l", TP.FLOAT, ["batch", 1, C, ROPE + R]))
            for s in ("l", "lv"):
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{s}", TP.FLOAT, ["batch", 1, C, ROPE + R]))
            out, _, _ = b.op("LatentAttentionGQA", x, qr, ck, kr, pos, cos, sin, f"past.{i}.l", norm, wuk, wuv,
                             _domain="perseus", _outputs=[f"o{i}", f"present.{i}.l", f"present.{i}.lv"],
                             num_heads=H, scale=0.1, epsilon=1e-6)
        x = b.Mul(out, b.const(0.5, np.float32)) if V * H == NOPE * H else out
    b.Identity(x, _outputs=["y"])
    outputs.insert(0, helper.make_tensor_value_info("y", TP.FLOAT, None))
    g = helper.make_graph(b.nodes, "m", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    fn = ops.latent_attention() if kind == "cur" else gqa_function()
    return helper.make_model(g, ir_version=IR_VERSION, functions=[fn],
                             opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("perseus", 1),
                                            helper.make_opsetid("com.microsoft", 1)])

def session(kind):
    so = ort.SessionOptions(); so.intra_op_num_threads = THREADS; so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    s = ort.InferenceSession(build(kind).SerializeToString(), so, providers=["CPUExecutionProvider"])
    bind = s.io_binding(); bufs = {}
    for inp in s.get_inputs():
        if inp.name.startswith("past."):
            shape = [1] + list(inp.shape[1:])
            a = np.zeros(shape, np.float32); v = ort.OrtValue.ortvalue_from_numpy(a); bufs[inp.name] = (a, v)
            bind.bind_ortvalue_input(inp.name, v)
            bind.bind_ortvalue_output(inp.name.replace("past", "present"), v)
            if kind == "gqa":
                bind.bind_ortvalue_output(inp.name.replace("past", "present") + "v", v)
    x = np.ones((1, 1, H * NOPE), np.float32) * 0.1
    bind.bind_cpu_input("x", x)
    bind.bind_output("y")
    return s, bind, bufs

res = {}
sess = {k: session(k) for k in ("cur", "gqa")}
# fill CTX rows one token at a time (also checks equal outputs)
outs = {}
for k, (s, bind, bufs) in sess.items():
    for p in range(CTX):
        bind.bind_cpu_input("position", np.array([p], np.int64)); s.run_with_iobinding(bind)
    outs[k] = bind.get_outputs()[-1].numpy().copy()
print("max diff", float(np.abs(outs["cur"] - outs["gqa"]).max()), float(np.abs(outs["cur"]).max()))
times = {k: [] for k in sess}
for rnd in range(7):
    for k, (s, bind, bufs) in sess.items():
        bind.bind_cpu_input("position", np.array([CTX], np.int64))
        ts = []
        for _ in range(200):
            t0 = time.perf_counter(); s.run_with_iobinding(bind); ts.append(time.perf_counter() - t0)
        times[k].append(np.median(ts))
for k in times: print(k, "us/step", round(np.median(times[k]) * 1e6, 1))
print("speedup gqa vs cur", round(np.median(times["cur"]) / np.median(times["gqa"]), 3))
