"""The native perseus kernels (perseus_edge/runtime/kernels): same results as the ops' bodies.

Every check runs the same graph twice, once with the custom-op library registered (the native
`perseus.LatentAttention`) and once without (onnxruntime inlines the op's function body), and
against PyTorch where the weights are float. Dimensions cover both code paths: the tiny preset
(4 heads, rope 8: the portable C++ loops) and a tiny model with 17M-like attention shapes
(heads a multiple of 4, kv rank a multiple of 64, rope 16: the AVX-512 / VNNI loops on x86),
which PERSEUS_KERNELS_GENERIC=1 sends down the portable loops again (as on a CPU without AVX-512,
or not x86). `perseus.SparseMoE` is also checked alone, against numpy, with its AVX-512 loops
and with its portable ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from perseus_edge import modelfile as mf
from perseus_edge.runtime import kernels

torch = pytest.importorskip("torch")

from perseus_edge.build import export_checkpoint, quantize_model  # noqa: E402
from graph_session import CachedSession  # noqa: E402  (tests/graph_session.py)
from test_export import torch_greedy  # noqa: E402

LIBRARY = kernels.library()
pytestmark = pytest.mark.skipif(LIBRARY is None, reason="native kernels not built (no C++ compiler at install)")

WIDE = dict(num_attention_heads=4, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
EIGHT = dict(WIDE, num_attention_heads=8, max_position_embeddings=640)  # decode: heads in 2 groups of 4
SHAPES = {"tiny": {}, "wide": WIDE, "eight": EIGHT}


@pytest.fixture(scope="module")
def folders(make_checkpoint, tmp_path_factory):
    """folders(shape, scheme) -> (checkpoint, exported ort-cpu folder, quantized with `scheme`)."""
    cache = {}

    def get(shape: str, scheme: str | None = None):
        key = (shape, scheme)
        if key not in cache:
            ckpt = make_checkpoint(**SHAPES[shape])
            if (shape, None) not in cache:
                out = tmp_path_factory.mktemp(f"kernels-{shape}") / "fp32"
                cache[(shape, None)] = (ckpt, export_checkpoint(ckpt, out, target="ort-cpu"))
            if scheme:
                base = cache[(shape, None)][1]
                cache[key] = (ckpt, quantize_model(base, base.parent / scheme, scheme, target="ort-cpu"))
        return cache[key]

    return get


def vocab(folder) -> int:
    return json.loads((folder / mf.CONFIG).read_text())["vocab_size"]


@pytest.mark.parametrize("shape,generic", [("tiny", False), ("wide", False), ("wide", True)])
def test_native_matches_pytorch(shape, generic, folders, monkeypatch):
    """Prefill + 40 greedy steps, batch of 2, cache in place: the native kernel against PyTorch's
    cached decode, within the export tests' tolerance, and against the function body."""
    if generic:
        monkeypatch.setenv("PERSEUS_KERNELS_GENERIC", "1")
    ckpt, folder = folders(shape)
    prompt = np.random.default_rng(1).integers(2, vocab(folder), (2, 37))
    ref_logits, ref_tokens = torch_greedy(ckpt, prompt, 40)
    logits, tokens = CachedSession(folder / mf.MODEL_ONNX, batch=2, library=LIBRARY).greedy(prompt, 40)
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert max(float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits)) <= 1e-4
    body, _ = CachedSession(folder / mf.MODEL_ONNX, batch=2).greedy(prompt, 40)
    assert max(float(np.abs(a - b).max()) for a, b in zip(logits, body)) <= 1e-4


@pytest.mark.parametrize("prompt_len", [37, 530])
def test_one_sequence_decode_splits_heads(prompt_len, folders):
    """One sequence's decode step runs its heads in groups of 4 as separate items (8 heads: 2),
    and past 512 cached keys also its keys in two blocks (4 items): the same logits as the body."""
    _, folder = folders("eight")
    prompt = np.random.default_rng(prompt_len).integers(2, vocab(folder), (1, prompt_len))
    native, tokens = CachedSession(folder / mf.MODEL_ONNX, threads=2, library=LIBRARY).greedy(prompt, 12)
    body, body_tokens = CachedSession(folder / mf.MODEL_ONNX, threads=2).greedy(prompt, 12)
    np.testing.assert_array_equal(tokens, body_tokens)
    assert max(float(np.abs(a - b).max()) for a, b in zip(native, body)) <= 1e-4


def test_rows_at_different_positions_and_copied_cache(folders):
    """A batch whose rows sit at different positions (a server's), with present.* bound apart from
    past.* (the kernel then copies the cache first), equals the body's result row for row."""
    _, folder = folders("wide")
    prompt = np.random.default_rng(2).integers(2, vocab(folder), (2, 70))
    runs = []
    for library in (LIBRARY, None):
        session = CachedSession(folder / mf.MODEL_ONNX, batch=2, inplace=False, library=library)
        out = [session(prompt, 0)]
        out.append(session(np.array([[7], [9]]), np.array([70, 12])))  # row 1 rewinds to 12
        out.append(session(np.array([[3, 4, 5], [6, 7, 8]]), np.array([71, 13])))
        runs.append(out)
    for native, body in zip(*runs):
        assert float(np.abs(native - body).max()) <= 1e-4


def test_native_int8_matches_body(folders):
    """int8 W_UK / W_UV (codes + scales): the kernel quantizes its activation per tensor as
    DynamicQuantizeMatMul does; ties in rounding may land one code apart, so the logits agree
    to within a small fraction of their range, not bit for bit."""
    for shape in ("tiny", "wide"):
        _, folder = folders(shape, "int8")
        prompt = np.random.default_rng(3).integers(2, vocab(folder), (1, 48))
        native, _ = CachedSession(folder / mf.MODEL_ONNX, library=LIBRARY).greedy(prompt, 24)
        body, _ = CachedSession(folder / mf.MODEL_ONNX).greedy(prompt, 24)
        for a, b in zip(native, body):
            assert float(np.abs(a - b).max()) <= 0.02 * float(np.abs(b).max())
            assert (a[:, -1].argmax(-1) == b[:, -1].argmax(-1)).all()


def test_runtime_uses_the_kernels_where_the_graph_allows(folders, tmp_path, monkeypatch):
    """`Model` registers the library for a float cache; an int8 cache (an op signature the
    attention kernel does not take) loads with the MoE kernel alone and the attention body (the
    same logits as all bodies); PERSEUS_KERNELS=0 turns the library off."""
    from perseus_edge.runtime.model import Model

    _, folder = folders("wide", "int8")
    assert Model(folder, verify=False).native_kernels
    kv8 = quantize_model(folders("wide")[1], tmp_path / "kv8", "int4", target="ort-cpu", kv_cache="int8")
    model = Model(kv8, verify=False)
    ids = np.array([[5, 6, 7]])
    got = model.forward(ids, 0)
    assert model.native_kernels == (kernels.library() is not None)
    monkeypatch.setenv("PERSEUS_KERNELS", "0")
    want = Model(kv8, verify=False).forward(ids, 0)
    monkeypatch.undo()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    bogus = tmp_path / "_perseus_kernels.so"  # e.g. another platform's build: not loadable here
    bogus.write_bytes(b"not a library")
    monkeypatch.setattr(kernels, "library", lambda: bogus)
    assert not Model(folder, verify=False).native_kernels
    monkeypatch.undo()
    monkeypatch.setenv("PERSEUS_KERNELS", "0")
    assert kernels.library() is None and not Model(folder, verify=False).native_kernels


def test_out_of_range_position_is_an_error_not_a_write(folders, monkeypatch):
    """A position past the cache is refused by the kernel (onnxruntime reports its message).
    The check precedes the loops; PERSEUS_KERNELS_GENERIC=1 registers the attention kernel on
    any CPU (without AVX-512 the library otherwise leaves the op to its body)."""
    monkeypatch.setenv("PERSEUS_KERNELS_GENERIC", "1")
    _, folder = folders("tiny")
    session = CachedSession(folder / mf.MODEL_ONNX, library=LIBRARY)
    before = {k: v.copy() for k, v in session.caches.items()}
    with pytest.raises(Exception, match="perseus.LatentAttention: position"):
        session(np.array([[5]]), session.max_context)
    assert all(np.array_equal(before[k], session.caches[k]) for k in before)


# ----------------------------------------------------------------------------- perseus.SparseMoE alone
def _sparse_moe_session(top_k: int, normalize: int, scaling: float, block: int | None, bits: int = 8,
                        n_shared: int = 0, fc2_transposed: int = 0):
    """A one-node graph: perseus.SparseMoE over float experts, or codes + scales (blocks of
    `block`; 4 bits with zero points); inputs x, router, router_bias, fc1, fc2 (+ scales, zero
    points) are fed at run time."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    codes = TensorProto.UINT8 if block else TensorProto.FLOAT
    names = ["x", "router", "router_bias", "fc1", "fc2"] + (["fc1_scale", "fc2_scale"] if block else [])
    names += ["fc1_zero_point", "fc2_zero_point"] if block and bits == 4 else []
    inputs = [helper.make_tensor_value_info(n, codes if n in ("fc1", "fc2") else
                                            TensorProto.UINT8 if "zero" in n else TensorProto.FLOAT, None)
              for n in names]  # no shapes: the kernel checks them
    node = helper.make_node(mf.OP_SPARSE_MOE, [i.name for i in inputs], ["y"], domain=mf.PERSEUS_DOMAIN,
                            top_k=top_k, normalize=normalize, scaling=scaling,
                            **({"n_shared": n_shared} if n_shared else {}),
                            **({"fc2_transposed": 1} if fc2_transposed else {}))
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24), helper.make_opsetid(mf.PERSEUS_DOMAIN, 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(LIBRARY))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.fixture(params=["avx512", "generic"])
def loops(request, monkeypatch):
    """Each SparseMoE check twice: the AVX-512 loops (where the CPU has them) and the portable
    ones (PERSEUS_KERNELS_GENERIC=1, as on a CPU without AVX-512 or not x86)."""
    if request.param == "generic":
        monkeypatch.setenv("PERSEUS_KERNELS_GENERIC", "1")
    return request.param


def _int8_blocks(v, block):
    """v as the kernel multiplies it with 4-bit experts: int8 per block, scale = max |v| / 127,
    rounded to nearest even (float32 arithmetic), dequantized."""
    v = np.asarray(v, np.float32).reshape(-1, block)
    s = (np.abs(v).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s > 0, np.rint(np.clip(v / s, -127, 127)), 0)
    return (q * s).reshape(-1).astype(np.float64)


def _sparse_moe_reference(x, router, bias, fc1, fc2, top_k, normalize, scaling, act_block=None, n_shared=0):
    """numpy: sigmoid scores, top-k of score + bias (lower index first on ties), SwiGLU experts
    with gate / up rows interleaved in fc1 [E, 2F, d], fc2 [E, d, F], then the n_shared experts
    after the routed ones with weight 1; with `act_block`, each expert's input quantized to int8
    blocks first (the 4-bit experts' integer path)."""
    tokens = x.reshape(-1, x.shape[-1]).astype(np.float64)
    y = np.zeros_like(tokens)
    q = (lambda v: _int8_blocks(v, act_block)) if act_block else (lambda v: v)
    for t, v in enumerate(tokens):
        score = 1 / (1 + np.exp(-(v @ router)))
        chosen = np.argsort(-(score + bias), kind="stable")[:top_k]
        weights = score[chosen] / (score[chosen].sum() if normalize else 1.0) * scaling
        n_routed = router.shape[1]
        chosen = list(chosen) + list(range(n_routed, n_routed + n_shared))
        weights = list(weights) + [1.0] * n_shared
        for e, w in zip(chosen, weights):
            h = (fc1[e] @ q(v)).astype(np.float32)
            gate, up = h[0::2], h[1::2]
            y[t] += w * (fc2[e] @ q(gate / (1 + np.exp(-gate)) * up))
    return y.reshape(x.shape)


@pytest.mark.parametrize("d,F,block,T,transposed", [
    (64, 16, None, 1, 0), (64, 16, None, 7, 0), (20, 6, None, 5, 0), (64, 16, None, 1, 1), (80, 16, None, 7, 1),
    (20, 6, None, 5, 1), (64, 32, 16, 1, 0), (64, 32, 32, 9, 0)])
def test_sparse_moe_matches_numpy(d, F, block, T, transposed, loops):
    """The native perseus.SparseMoE against a numpy reference: decode (T=1) and a prompt (tokens
    grouped by expert), float experts of any width (masked vector tails), float fc2 passed
    transposed ([E, F, d], attribute fc2_transposed: 64 / 16 / single output columns) and 8-bit
    blocks."""
    E, top_k = 8, 3
    rng = np.random.default_rng(d + F + T)
    x = rng.standard_normal((1, T, d)).astype(np.float32)
    router = (rng.standard_normal((d, E)) / np.sqrt(d)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(E)).astype(np.float32)
    fc1 = (rng.standard_normal((E, 2 * F, d)) / np.sqrt(d)).astype(np.float32)
    fc2 = (rng.standard_normal((E, d, F)) / np.sqrt(F)).astype(np.float32)
    feed = {"x": x, "router": router, "router_bias": bias}
    if block:  # symmetric 8-bit blocks: w = (code - 128) * scale
        for name, w in (("fc1", fc1), ("fc2", fc2)):
            q = rng.integers(0, 256, w.shape).astype(np.uint8)
            scale = (rng.random(w.shape[:2] + (w.shape[2] // block,)) / 64).astype(np.float32)
            feed[name], feed[f"{name}_scale"] = q, scale
            w[...] = (q.astype(np.float32) - 128) * np.repeat(scale, block, axis=2)
    else:
        feed.update(fc1=fc1, fc2=np.ascontiguousarray(fc2.transpose(0, 2, 1)) if transposed else fc2)
    for normalize, scaling in ((1, 1.0), (0, 2.5)):
        session = _sparse_moe_session(top_k, normalize, scaling, block, fc2_transposed=transposed)
        got = session.run(None, feed)[0]
        want = _sparse_moe_reference(x, router, bias, fc1, fc2, top_k, normalize, scaling)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def _pack4(q):
    """uint8 values < 16 along the last axis, two per byte, low nibble first (odd lengths padded)."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


@pytest.mark.parametrize("path", ["vnni", "avx512bw", "generic"])
@pytest.mark.parametrize("d,F,block,T", [(128, 48, 16, 1), (80, 48, 16, 6), (64, 32, 32, 9), (256, 64, 64, 1),
                                         (128, 128, 128, 3)])
def test_sparse_moe_4bit_matches_numpy(d, F, block, T, path, monkeypatch):
    """4-bit experts with zero points, in the panels lower/qmoe.py packs, multiplied in integers
    on int8 blocks of the activations, against numpy doing the same in float: blocks 16..128, an
    odd count of blocks per row (48 / 16), decode and prompts (1-4 tokens per expert); with VNNI,
    with the AVX-512BW instructions it replaces, and with the portable loops."""
    from perseus_edge.lower.qmoe import pack_panels

    if path == "avx512bw":
        monkeypatch.setenv("PERSEUS_KERNELS_NO_VNNI", "1")
    if path == "generic":
        monkeypatch.setenv("PERSEUS_KERNELS_GENERIC", "1")
    E, top_k = 8, 3
    rng = np.random.default_rng(d + F + T + block)
    x = rng.standard_normal((1, T, d)).astype(np.float32)
    router = (rng.standard_normal((d, E)) / np.sqrt(d)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(E)).astype(np.float32)
    feed = {"x": x, "router": router, "router_bias": bias}
    weights = {}
    for name, shape in (("fc1", (E, 2 * F, d)), ("fc2", (E, d, F))):
        q = rng.integers(0, 16, shape).astype(np.uint8)
        zero = rng.integers(0, 16, shape[:2] + (shape[2] // block,)).astype(np.uint8)
        scale = (rng.random(shape[:2] + (shape[2] // block,)) / (8 * np.sqrt(shape[2]))).astype(np.float32)
        feed[name], feed[f"{name}_scale"], feed[f"{name}_zero_point"] = pack_panels(_pack4(q), scale, _pack4(zero))
        weights[name] = ((q.astype(np.float32) - np.repeat(zero, block, axis=2)) * np.repeat(scale, block, axis=2))
    session = _sparse_moe_session(top_k, 1, 1.0, block, bits=4)
    got = session.run(None, feed)[0]
    want = _sparse_moe_reference(x, router, bias, weights["fc1"], weights["fc2"], top_k, 1, 1.0, act_block=block)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))


@pytest.mark.parametrize("path", ["vnni", "avx512bw", "generic"])
def test_sparse_moe_4bit_largest_sums(path, monkeypatch):
    """Every code 15, zero points 0, activations at +127 in blocks of 128: the largest integer
    sums a block can make (the portable loops sum eight groups in 16 bits, then widen)."""
    from perseus_edge.lower.qmoe import pack_panels

    monkeypatch.setenv(*{"vnni": ("PERSEUS_KERNELS_NO_VNNI", "0"), "avx512bw": ("PERSEUS_KERNELS_NO_VNNI", "1"),
                         "generic": ("PERSEUS_KERNELS_GENERIC", "1")}[path])
    E, top_k, d, F, block = 4, 2, 256, 128, 128
    rng = np.random.default_rng(7)
    x = np.ones((1, 3, d), np.float32)
    router = (rng.standard_normal((d, E)) / np.sqrt(d)).astype(np.float32)
    feed = {"x": x, "router": router, "router_bias": np.zeros(E, np.float32)}
    weights = {}
    for name, shape in (("fc1", (E, 2 * F, d)), ("fc2", (E, d, F))):
        q = np.full(shape, 15, np.uint8)
        zero = np.zeros(shape[:2] + (shape[2] // block,), np.uint8)
        scale = np.full(shape[:2] + (shape[2] // block,), 1e-3, np.float32)
        feed[name], feed[f"{name}_scale"], feed[f"{name}_zero_point"] = pack_panels(_pack4(q), scale, _pack4(zero))
        weights[name] = (q.astype(np.float32) - np.repeat(zero, block, axis=2)) * np.repeat(scale, block, axis=2)
    got = _sparse_moe_session(top_k, 1, 1.0, block, bits=4).run(None, feed)[0]
    want = _sparse_moe_reference(x, router, feed["router_bias"], weights["fc1"], weights["fc2"], top_k, 1, 1.0,
                                 act_block=block)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))


@pytest.mark.parametrize("bits", [32, 8, 4])
@pytest.mark.parametrize("T", [1, 5])
def test_sparse_moe_shared_experts(bits, T, loops):
    """Shared experts (attribute n_shared) after the routed ones in fc1 / fc2: always selected,
    weight 1, neither normalized nor scaled; float, 8-bit and 4-bit experts."""
    from perseus_edge.lower.qmoe import pack_panels

    E, S, top_k, d, F, block = 8, 2, 3, 64, 32, 16
    rng = np.random.default_rng(T + bits)
    x = rng.standard_normal((1, T, d)).astype(np.float32)
    router = (rng.standard_normal((d, E)) / np.sqrt(d)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(E)).astype(np.float32)
    feed = {"x": x, "router": router, "router_bias": bias}
    weights = {}
    for name, shape in (("fc1", (E + S, 2 * F, d)), ("fc2", (E + S, d, F))):
        nb = shape[2] // block
        if bits == 32:
            feed[name] = weights[name] = (rng.standard_normal(shape) / np.sqrt(shape[2])).astype(np.float32)
            continue
        scale = (rng.random(shape[:2] + (nb,)) / (8 * np.sqrt(shape[2]))).astype(np.float32)
        if bits == 8:
            q = rng.integers(0, 256, shape).astype(np.uint8)
            feed[name], feed[f"{name}_scale"] = q, scale
            weights[name] = (q.astype(np.float32) - 128) * np.repeat(scale, block, axis=2)
        else:
            q = rng.integers(0, 16, shape).astype(np.uint8)
            zero = rng.integers(0, 16, shape[:2] + (nb,)).astype(np.uint8)
            feed[name], feed[f"{name}_scale"], feed[f"{name}_zero_point"] = pack_panels(_pack4(q), scale, _pack4(zero))
            weights[name] = (q.astype(np.float32) - np.repeat(zero, block, axis=2)) * np.repeat(scale, block, axis=2)
    session = _sparse_moe_session(top_k, 1, 2.5, None if bits == 32 else block, bits=min(bits, 8) if bits != 4 else 4,
                                  n_shared=S)
    got = session.run(None, feed)[0]
    want = _sparse_moe_reference(x, router, bias, weights["fc1"], weights["fc2"], top_k, 1, 2.5,
                                 act_block=block if bits == 4 else None, n_shared=S)
    tol = 1e-3 if bits == 4 else 1e-4
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()))


def test_sparse_moe_refuses_mismatched_experts():
    """Experts whose shapes disagree with x and the router are an error naming the input."""
    session = _sparse_moe_session(2, 1, 1.0, None)
    feed = {"x": np.ones((1, 1, 32), np.float32), "router": np.ones((32, 4), np.float32),
            "router_bias": np.zeros(4, np.float32), "fc1": np.ones((4, 32, 32), np.float32),
            "fc2": np.ones((4, 32, 15), np.float32)}
    with pytest.raises(Exception, match="perseus.SparseMoE: fc2 has the wrong shape"):
        session.run(None, feed)


def _linear_session(native: bool, threads: int = 2):
    """A one-node graph: perseus.Linear(x, weight), both fed at run time; with the library
    registered (the native kernel) or not (onnxruntime runs the op's body, lower/passes.py `linear`)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from perseus_edge.lower.passes import linear

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "weight")]
    node = helper.make_node(mf.OP_LINEAR, ["x", "weight"], ["y"], domain=mf.PERSEUS_DOMAIN)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24), helper.make_opsetid(mf.PERSEUS_DOMAIN, 1)],
                              functions=[linear()])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if native:
        so.register_custom_ops_library(str(LIBRARY))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("rows,K,N", [(1, 512, 1000), (1, 20, 37), (3, 64, 70), (6, 100, 260), (0, 16, 5)])
def test_linear_matches_numpy_and_its_body(rows, K, N, loops):
    """perseus.Linear = x W^T: one row (decode), several (a prompt's every logit: 4 at a time and
    a remainder), K not a multiple of 16 (masked tails), N not a multiple of 4 or of a thread's
    rows; and the body stock onnxruntime runs gives the same."""
    rng = np.random.default_rng(rows * 1000 + K)
    x = rng.standard_normal((2, rows, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    want = x @ w.T
    for native in (True, False):
        got = _linear_session(native).run(None, {"x": x, "weight": w})[0]
        assert got.shape == (2, rows, N)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max(initial=0))))


def test_linear_refuses_mismatched_weight():
    with pytest.raises(Exception, match=r"perseus.Linear: x \[\.\.\., K\] and weight \[N, K\] expected"):
        _linear_session(True).run(None, {"x": np.ones((1, 1, 8), np.float32), "weight": np.ones((4, 9), np.float32)})
