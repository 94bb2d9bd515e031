"""ort-cpu's quantized experts (perseus.SparseMoE over QMoE's codes) against a dequantized
reference, tightly.

Logit tolerances against fp32 (5% int8, 25% int4) are wider than what zeroing every routed
expert does to the test model, so they cannot see broken experts. Two exact checks can:

1. the stored codes, scales and zero points dequantize to the exported fp32 experts within half
   a quantization step per weight, one for 8-bit (wrong expert order, layout, scales or padding
   fail);
2. the quantized graph equals the same graph with float experts (those dequantized weights) in
   its SparseMoE calls, to 1e-4: for the body (com.microsoft.QMoE: how it is fed, bits, block
   size, zero points) and for the native kernel (how it reads the codes).

4-bit experts at accuracy_level 4 (the default) come in the native kernel's panels and multiply
int8 activations: checked by 1. (through an independent unpacking), the body's unpacking
nodes against it exactly, and the kernel against its numpy twin (test_kernels.py).
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

from perseus_edge.modelfile import names as mf  # noqa: E402
from perseus_edge.quantize import weights as qw  # noqa: E402

def _dequantize(packed, scales, zeros, k: int, bits: int, block: int) -> np.ndarray:
    """[E, N, K*bits/8] codes -> float [E, N, K] as QMoE multiplies by."""
    out = []
    for e in range(packed.shape[0]):
        n = packed.shape[1]
        bw = qw.BlockWeight(packed[e].reshape(n, -1, block * bits // 8), scales[e],
                            None if zeros is None else zeros[e], k, n, bits, block)
        out.append(qw.dequantize_blockwise(bw).T)
    return np.stack(out)


def _logits(folder, prompt, steps=6):
    from perseus_edge.runtime.model import Model

    model = Model(folder, threads=1)
    out = [model.forward(prompt, 0).copy()]
    for i in range(steps):
        tok = np.array([[int(out[-1][0, -1].argmax())]])
        out.append(model.forward(tok, prompt.shape[1] + i).copy())
    return out


@pytest.fixture(scope="module")
def folders(make_checkpoint, tmp_path_factory):
    from perseus_edge.build import export_checkpoint, quantize_model

    tmp = tmp_path_factory.mktemp("qmoe")
    ckpt = make_checkpoint()
    portable = export_checkpoint(ckpt, tmp / "portable")
    fp32 = export_checkpoint(ckpt, tmp / "fp32-ort", target="ort-cpu")
    # accuracy_level 0: fp32 activations, so the kernel's only approximation is the weights
    quant = {s: quantize_model(portable, tmp / s, s, target="ort-cpu", accuracy_level=0) for s in ("int8", "int4")}
    quant["int4-panels"] = quantize_model(portable, tmp / "int4-panels", "int4", target="ort-cpu")
    return fp32, quant


def _unpanel(codes, scales, zeros):
    """The native kernel's 4-bit panels (lower/qmoe.py `pack_panels`) back to QMoE's layout, by
    the layout's definition: byte j of row i, group g holds codes 8g + j (low) and 8g + 4 + j."""
    e, p, g = codes.shape[:3]
    q = np.empty((e, p, 16, 8 * g), np.uint8)
    for j in range(4):
        q[..., j::8] = (codes[..., j] & 0x0F).transpose(0, 1, 3, 2)
        q[..., 4 + j::8] = (codes[..., j] >> 4).transpose(0, 1, 3, 2)
    q = q.reshape(e, 16 * p, 8 * g)
    b = scales.shape[2]
    z = np.zeros((e, 16 * p, b + b % 2), np.uint8)
    z[..., :b] = zeros.transpose(0, 1, 3, 2).reshape(e, 16 * p, b)
    pack = lambda a: (a[..., 0::2] | (a[..., 1::2] << 4)).astype(np.uint8)  # noqa: E731
    return pack(q), np.ascontiguousarray(scales.transpose(0, 1, 3, 2).reshape(e, 16 * p, b)), pack(z)


QUANT_ATTRS = ("expert_weight_bits", "weights_prepacked", "accuracy_level", "block_size")


def _dequantized_reference(qdir, fp32_dir, out):
    """`qdir` with its quantized experts replaced by the float experts they encode, written to
    `out`: int8 keeps its perseus.SparseMoE calls (float codes in, the float body); int4 has
    QMoE inlined (lower/qmoe.py), replaced by the float com.microsoft.MoE. On the way, check that
    the codes encode the exported experts: every weight within half a step of its fp32 value (a
    whole one for 8-bit), the padding zero."""
    from perseus_edge.lower.passes import sparse_moe
    from perseus_edge.manifest import read_manifest, write_manifest
    from perseus_edge.modelfile.writer import save_graph

    model = onnx.load(str(qdir / mf.MODEL_ONNX))
    fp32 = onnx.load(str(fp32_dir / mf.MODEL_ONNX))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ref_inits = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    ref_calls = _nodes(fp32, mf.PERSEUS_DOMAIN, mf.OP_SPARSE_MOE)
    calls, inline = _nodes(model, mf.PERSEUS_DOMAIN, mf.OP_SPARSE_MOE), _nodes(model, mf.MS_DOMAIN, "QMoE")
    assert bool(calls) != bool(inline) and len(calls or inline) == len(ref_calls)
    body = inline[0] if inline else next(n for f in model.functions for n in f.node if n.op_type == "QMoE")
    attrs = {a.name: helper.get_attribute_value(a) for a in body.attribute}
    bits, block = attrs["expert_weight_bits"], attrs["block_size"]
    for site, ref in zip(calls or inline, ref_calls):
        if inline:
            p1, s1, p2, s2 = (site.input[i] for i in (2, 3, 5, 6))
            z1, z2 = site.input[11:13] if len(site.input) > 11 else (None, None)
        else:
            p1, p2, s1, s2 = site.input[3:7]
            z1, z2 = site.input[7:9] if len(site.input) > 7 else (None, None)
            if z1:  # 4-bit panels
                for p, s, z in ((p1, s1, z1), (p2, s2, z2)):
                    inits[p], inits[s], inits[z] = _unpanel(inits[p], inits[s], inits[z])
        w1, w2 = ref_inits[ref.input[3]], ref_inits[ref.input[4]]  # [E, 2F, d], [E, d, F]
        if any(a.name == "fc2_transposed" and helper.get_attribute_value(a) for a in ref.attribute):
            w2 = w2.transpose(0, 2, 1)  # the fp32 folder's float fc2 is [E, F, d]
        d, f = w2.shape[1], w2.shape[2]
        fc1 = _dequantize(inits[p1], inits[s1], inits.get(z1), d, bits, block)  # [E, 2Fp, d]
        fc2 = _dequantize(inits[p2], inits[s2], inits.get(z2), fc1.shape[1] // 2, bits, block)  # [E, d, Fp]
        for deq, w, scale in ((fc1, w1, inits[s1]), (fc2, w2, inits[s2])):
            step = np.abs(np.repeat(scale, block, axis=2))  # [E, N, K]: each weight's block step
            n, k = w.shape[1:]
            # half a step; a whole one for 8-bit, whose symmetric grid (MLAS's) maps the larger
            # magnitude to -128 and may clip the other end of the block at +127
            err = np.abs(deq[:, :n, :k] - w) - (1.0 if bits == 8 else 0.5) * step[:, :n, :k]
            assert err.max() <= 1e-6, (site.name, float(err.max()))
        assert not fc1[:, 2 * f:].any() and not fc2[..., f:].any()
        n1, n2 = site.name + ".fc1_deq", site.name + ".fc2_deq"
        model.graph.initializer.extend([numpy_helper.from_array(fc1.astype(np.float32), n1),
                                        numpy_helper.from_array(fc2.astype(np.float32), n2)])
        if inline:
            kept = {k: v for k, v in attrs.items() if k not in QUANT_ATTRS}
            site.CopyFrom(helper.make_node("MoE", [site.input[0], site.input[1], n1, "", n2], list(site.output),
                                           name=site.name, domain=mf.MS_DOMAIN, **kept))
        else:
            del site.input[3:]
            site.input.extend([n1, n2])
    if calls:  # the float body for the float arguments
        call_attrs = {a.name: helper.get_attribute_value(a) for a in calls[0].attribute}
        kept = [f for f in model.functions if f.name != mf.OP_SPARSE_MOE]
        del model.functions[:]
        model.functions.extend(kept + [sparse_moe(call_attrs["top_k"], call_attrs["normalize"], call_attrs["scaling"],
                                                  inits[calls[0].input[1]].shape[1], call_attrs.get("n_shared", 0),
                                                  fc2_transposed=0)])
    out.mkdir()
    save_graph(model, out)
    for name in (mf.CONFIG, mf.TOKENIZER, mf.GENERATION_CONFIG):
        (out / name).write_bytes((qdir / name).read_bytes())
    write_manifest(out, read_manifest(qdir)["kind"])
    return out


def _nodes(model, domain, op):
    return [n for n in model.graph.node if (n.domain, n.op_type) == (domain, op)]


def _assert_same_logits(qdir, ref_dir):
    prompt = np.random.default_rng(0).integers(2, 512, (1, 12))
    got, want = _logits(qdir, prompt), _logits(ref_dir, prompt)
    err = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    scale = max(float(np.abs(b).max()) for b in want)
    assert err <= 1e-4 * max(1.0, scale), err


@pytest.mark.parametrize("scheme", [
    pytest.param("int8", marks=pytest.mark.xfail(strict=True, reason=(
        "onnxruntime 1.32's 8-bit block-wise QMoE differs from the float MoE on its own dequantized "
        "weights by 1.3e-2 (logits up to 0.68), int4 by 9e-8: the int8 ort-cpu experts are not "
        "what the manifest says; the native kernel's are (below); drop this mark when they match"))),
    "int4"])
def test_qmoe_equals_its_dequantized_experts(folders, tmp_path, scheme, monkeypatch):
    """The SparseMoE body (routing + com.microsoft.QMoE), as stock onnxruntime runs it."""
    monkeypatch.setenv("PERSEUS_KERNELS", "0")
    fp32_dir, quant = folders
    _assert_same_logits(quant[scheme], _dequantized_reference(quant[scheme], fp32_dir, tmp_path / "deq"))


def test_native_sparse_moe_equals_its_dequantized_experts(folders, tmp_path):
    """The native perseus.SparseMoE (runtime/kernels/sparse_moe.cc) on 8-bit codes equals itself on
    the float experts they encode (whose float path equals PyTorch and the body: test_kernels.py).
    (int4 experts keep QMoE: lower/qmoe.py.)"""
    scheme = "int8"
    from perseus_edge.runtime import kernels

    if kernels.library() is None:
        pytest.skip("native kernels not built")
    fp32_dir, quant = folders
    _assert_same_logits(quant[scheme], _dequantized_reference(quant[scheme], fp32_dir, tmp_path / "deq"))


def test_int4_panels_unpack_and_native_kernel(folders, tmp_path, monkeypatch):
    """4-bit panels (accuracy_level 4, the default): they encode the exported experts (within half
    a step, through `_unpanel`); the body's unpacking nodes give QMoE exactly that layout; the
    body (QMoE on int8 activations) stays near the float experts the codes encode (6e-3 of the
    logits' scale measured here: the activations' rounding), and the native kernel equals the
    body to 1e-4 (measured 3e-7: the same int8 activations, the same integer sums)."""
    import onnxruntime as ort
    from onnx import TensorProto

    from perseus_edge.lower.qmoe import unpack_panels
    from perseus_edge.modelfile.graph import OPSET, Builder
    from perseus_edge.runtime import kernels

    fp32_dir, quant = folders
    qdir = quant["int4-panels"]
    ref = _dequantized_reference(qdir, fp32_dir, tmp_path / "deq")
    model = onnx.load(str(qdir / mf.MODEL_ONNX))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    call = _nodes(model, mf.PERSEUS_DOMAIN, mf.OP_SPARSE_MOE)[0]
    b = Builder()
    outs = unpack_panels(b, "q", "s", "z")
    graph = helper.make_graph(
        b.nodes, "unpack", [helper.make_tensor_value_info(n, TensorProto.FLOAT if n == "s" else TensorProto.UINT8, None)
                            for n in "qsz"],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT if i == 1 else TensorProto.UINT8, None)
         for i, o in enumerate(outs)])
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    for p, s, z in (call.input[3:9:2], call.input[4:9:2]):  # fc1 (codes, scales, zero points), fc2
        got = session.run(None, {"q": inits[p], "s": inits[s], "z": inits[z]})
        for g, w in zip(got, _unpanel(inits[p], inits[s], inits[z])):
            np.testing.assert_array_equal(g, w)

    prompt = np.random.default_rng(0).integers(2, 512, (1, 12))
    want = _logits(ref, prompt)
    scale = max(float(np.abs(w).max()) for w in want)
    runs = {"body": "0"} | ({"native": "1"} if kernels.library() is not None else {})
    got = {}
    for name, flag in runs.items():
        monkeypatch.setenv("PERSEUS_KERNELS", flag)
        got[name] = _logits(qdir, prompt)
        err = max(float(np.abs(a - w).max()) for a, w in zip(got[name], want)) / scale
        assert err <= 1e-2, (name, err)
    if "native" in got:
        err = max(float(np.abs(a - w).max()) for a, w in zip(got["native"], got["body"])) / scale
        assert err <= 1e-4, err
