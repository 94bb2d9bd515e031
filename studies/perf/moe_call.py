"""Time one perseus.SparseMoE call of a model folder, the experts coming from DRAM as in a step.

    PYTHONPATH=$PWD python studies/perf/moe_call.py /tmp/sbs4/54m-fp32 --calls 200

One single-node session per layer (the layer's weights as initializers, the op's attributes),
called in turn over the layers with a new random token each time, so each call reads experts
that the previous seven calls did not; prints the best mean call time of 5 repetitions (Python's
~5 us per run included). Run it under two checkouts' PYTHONPATH to compare library builds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from perseus_edge.runtime import kernels


def sessions(folder: str, threads: int) -> list[tuple[ort.InferenceSession, str]]:
    model = onnx.load(f"{folder}/model.onnx")
    inits = {i.name: i for i in model.graph.initializer}
    body = next(f for f in model.functions if f.name == "SparseMoE")
    out = []
    for call in (n for n in model.graph.node if n.op_type == "SparseMoE"):
        x = helper.make_tensor_value_info(call.input[0], onnx.TensorProto.FLOAT, None)
        y = helper.make_tensor_value_info(call.output[0], onnx.TensorProto.FLOAT, None)
        node = helper.make_node("SparseMoE", list(call.input), list(call.output), domain="perseus",
                                **{a.name: helper.get_attribute_value(a) for a in call.attribute})
        graph = helper.make_graph([node], "g", [x], [y], [inits[n] for n in call.input[1:] if n in inits])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.register_custom_ops_library(str(kernels.library()))
        one = helper.make_model(graph, opset_imports=list(model.opset_import), functions=[body])
        out.append((ort.InferenceSession(one.SerializeToString(), so, providers=["CPUExecutionProvider"]), call.input[0]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--calls", type=int, default=200, help="calls per layer and repetition")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    layers = sessions(args.folder, args.threads)
    d = onnx.load(f"{args.folder}/model.onnx", load_external_data=False).graph
    d = next(i for i in d.initializer if i.name.endswith("mlp.router")).dims[0]
    xs = [np.random.default_rng(i).standard_normal((1, 1, d)).astype(np.float32) for i in range(64)]
    for i in range(50):
        for s, name in layers:
            s.run(None, {name: xs[i % 64]})
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for i in range(args.calls):
            for s, name in layers:
                s.run(None, {name: xs[i % 64]})
        best = min(best, (time.perf_counter() - t) / (args.calls * len(layers)))
    print(f"{args.folder}: {best * 1e6:.1f} us per SparseMoE call, threads {args.threads}")


if __name__ == "__main__":
    main()
