"""ort-cpu's quantized experts (com.microsoft.QMoE) against a dequantized reference, tightly.

Logit tolerances against fp32 (5% int8, 25% int4) are wider than what zeroing every routed
expert does to the test model, so they cannot see a broken QMoE. Two exact checks can:

1. the stored codes, scales and zero points dequantize to the exported fp32 experts within half
   a quantization step per weight, one for 8-bit (wrong expert order, layout, scales or padding
   fail);
2. the QMoE graph equals the same graph with its QMoE replaced by the float com.microsoft.MoE on
   those dequantized weights, to 1e-4 (how the kernel is fed: bits, block size, zero points).
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

from perseus_edge.modelfile import names as mf  # noqa: E402
from perseus_edge.quantize import weights as qw  # noqa: E402

QUANT_ATTRS = ("expert_weight_bits", "weights_prepacked", "accuracy_level", "block_size")


def _moe_nodes(model, op):
    return [n for n in model.graph.node if (n.domain, n.op_type) == (mf.MS_DOMAIN, op)]


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
    return fp32, quant


@pytest.mark.parametrize("scheme", [
    pytest.param("int8", marks=pytest.mark.xfail(strict=True, reason=(
        "onnxruntime 1.32's 8-bit block-wise QMoE differs from the float MoE on its own dequantized "
        "weights by 1.3e-2 (logits up to 0.68), int4 by 9e-8: the int8 ort-cpu experts are not "
        "what the manifest says; drop this mark when they match"))),
    "int4"])
def test_qmoe_equals_its_dequantized_experts(folders, tmp_path, scheme):
    from perseus_edge.manifest import read_manifest, write_manifest
    from perseus_edge.modelfile.writer import save_graph

    fp32_dir, quant = folders
    qdir = quant[scheme]
    model = onnx.load(str(qdir / mf.MODEL_ONNX))
    fp32 = onnx.load(str(fp32_dir / mf.MODEL_ONNX))
    inits = {t.name: t for t in model.graph.initializer}
    ref_inits = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    qmoe, moe = _moe_nodes(model, "QMoE"), _moe_nodes(fp32, "MoE")
    assert qmoe and len(qmoe) == len(moe)
    for node, ref in zip(qmoe, moe):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits, block = attrs["expert_weight_bits"], attrs["block_size"]
        assert bits == (8 if scheme == "int8" else 4)
        arr = {name: numpy_helper.to_array(inits[name]) for name in node.input if name in inits}
        x, logits, p1, s1, _, p2, s2 = list(node.input)[:7]
        z1, z2 = (list(node.input)[11:13] if len(node.input) > 11 else ("", ""))
        w1 = ref_inits[ref.input[2]]  # [E, 2F, d]
        w2 = ref_inits[ref.input[4]]  # [E, d, F]
        d = w2.shape[1]
        fc1 = _dequantize(arr[p1], arr[s1], arr.get(z1), d, bits, block)  # [E, 2Fp, d]
        fc2 = _dequantize(arr[p2], arr[s2], arr.get(z2), fc1.shape[1] // 2, bits, block)  # [E, d, Fp]
        f = w2.shape[2]
        # 1. every weight within half a step of the exported expert it encodes; padding is zero
        for deq, w, scale in ((fc1, w1, arr[s1]), (fc2, w2, arr[s2])):
            step = np.abs(np.repeat(scale, block, axis=2))  # [E, N, K]: each weight's block step
            n, k = w.shape[1:]
            # half a step; a whole one for 8-bit, whose symmetric grid (MLAS's) maps the larger
            # magnitude to -128 and may clip the other end of the block at +127
            err = np.abs(deq[:, :n, :k] - w) - (1.0 if bits == 8 else 0.5) * step[:, :n, :k]
            assert err.max() <= 1e-6, (node.name, float(err.max()))
        assert not fc1[:, 2 * f:].any() and not fc2[..., f:].any()
        # 2. the reference node: float MoE on the dequantized weights, same routing attributes
        n1, n2 = node.name + ".fc1_deq", node.name + ".fc2_deq"
        model.graph.initializer.extend([numpy_helper.from_array(fc1.astype(np.float32), n1),
                                        numpy_helper.from_array(fc2.astype(np.float32), n2)])
        kept = {k: v for k, v in attrs.items() if k not in QUANT_ATTRS}
        node.CopyFrom(helper.make_node("MoE", [x, logits, n1, "", n2], list(node.output), name=node.name,
                                       domain=mf.MS_DOMAIN, **kept))
    ref_dir = tmp_path / "deq"
    ref_dir.mkdir()
    save_graph(model, ref_dir)
    for name in (mf.CONFIG, mf.TOKENIZER, mf.GENERATION_CONFIG):
        (ref_dir / name).write_bytes((qdir / name).read_bytes())
    write_manifest(ref_dir, read_manifest(qdir)["kind"])
    vocab = numpy_helper.to_array(inits[next(iter(n for n in inits if "embed" in n))]).shape[0] \
        if any("embed" in n for n in inits) else 512
    prompt = np.random.default_rng(0).integers(2, min(vocab, 512), (1, 12))
    got, want = _logits(qdir, prompt), _logits(ref_dir, prompt)
    err = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    scale = max(float(np.abs(b).max()) for b in want)
    assert err <= 1e-4 * max(1.0, scale), err
