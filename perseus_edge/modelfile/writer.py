"""Write a `Program` as a model folder (layout in `perseus_edge.modelfile.names`).

    save(program, "model/")   # graph, config, tokenizer, generation config; checked; then manifest

Everything is written into a temp folder beside the destination and renamed into place at the
end (`manifest.atomic_folder`), after onnx.checker and an onnxruntime session have accepted the
written graph: a failed or killed write never leaves a half-written model where a good one is
expected, and a graph the runtime cannot load never replaces one.

Weights over EXTERNAL_BYTES go to model.onnx.data with every tensor at a 4 KiB-aligned offset:
that alignment is what lets onnxruntime memory-map them instead of reading them into RAM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
from onnx import TensorProto

from perseus_edge.errors import PerseusError
from perseus_edge.manifest import atomic_folder, write_manifest
from perseus_edge.modelfile import names as mf
from perseus_edge.modelfile.graph import perseus_ops
from perseus_edge.modelfile.program import Program
from perseus_edge.tokenizer import EOS, PAD

EXTERNAL_BYTES = 2 << 20  # above ~2 MB of weights the graph gets an external data file
INLINE_TENSOR_BYTES = 1024  # tensors this small stay in model.onnx
ALIGN = 4096  # the page size: ORT maps external data whose offsets are page-aligned
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.0}


def save(program: Program, folder: str | os.PathLike, force: bool = False) -> Path:
    """Write `program` as the model folder `folder` (replaced only when empty or `force`)."""
    folder = Path(folder)
    with atomic_folder(folder, force=force) as tmp:
        try:
            save_graph(program.graph, tmp)
            program.config.save(tmp / mf.CONFIG)
            (tmp / mf.TOKENIZER).write_bytes(program.tokenizer)
            (tmp / mf.GENERATION_CONFIG).write_text(json.dumps(program.generation, indent=2) + "\n")
        except OSError as e:
            raise PerseusError(f"cannot write the model folder {folder}: {e.strerror or e}") from None
        validate(tmp)
        records = {**program.records}
        for key in (mf.EXPORT_META, mf.QUANT_META):
            if key in records:
                records[key] = {**records[key], "perseus_ops": perseus_ops(program.graph)}
        write_manifest(tmp, program.kind, records)
    return folder


def save_graph(model: onnx.ModelProto, folder: Path) -> None:
    """model.onnx (+ model.onnx.data, page-aligned). `model` itself is left as it was."""
    tensors = [t for t in model.graph.initializer if len(t.raw_data) > INLINE_TENSOR_BYTES]
    if sum(len(t.raw_data) for t in tensors) <= EXTERNAL_BYTES:
        onnx.save_model(model, folder / mf.MODEL_ONNX)
        return
    moved = []
    try:
        with open(folder / mf.MODEL_DATA, "wb") as f:
            for t in tensors:
                f.write(b"\0" * (-f.tell() % ALIGN))
                offset, raw = f.tell(), t.raw_data
                f.write(raw)
                moved.append((t, raw))
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                for key, value in (("location", mf.MODEL_DATA), ("offset", offset), ("length", len(raw))):
                    t.external_data.add(key=key, value=str(value))
        onnx.save_model(model, folder / mf.MODEL_ONNX)
    finally:  # the Program keeps its weights in memory for the next stage
        for t, raw in moved:
            t.ClearField("external_data")
            t.data_location = TensorProto.DEFAULT
            t.raw_data = raw


def generation_config(tokenizer, max_context: int, config_eos=None) -> dict:
    """Runtime defaults: context length, end-of-text id from the tokenizer, sampling settings.

    config_eos: the checkpoint's own `eos_token_id` (a transformers folder with its own
    tokenizer), used when the tokenizer has no perseus end-of-text token."""
    eos, pad = tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)
    if eos is None and config_eos is not None:
        eos = config_eos[0] if isinstance(config_eos, list) and config_eos else config_eos
    if not isinstance(eos, int) or not 0 <= eos < tokenizer.get_vocab_size(with_added_tokens=True):
        raise PerseusError(f"the tokenizer has no {EOS} token and the config no eos_token_id within it: "
                           "the runtime could not stop generating")
    return {"max_context": max_context, "eos_token_id": eos, "pad_token_id": pad, "do_sample": True,
            **SAMPLING}


def validate(folder: Path) -> None:
    """onnx.checker (full) on the written graph, then an onnxruntime session on it."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(folder / mf.MODEL_ONNX), full_check=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several types, all with a message
        raise PerseusError(f"the graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(folder / mf.MODEL_ONNX), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise PerseusError(f"onnxruntime cannot load the graph: {str(e).strip().splitlines()[0]}") from None
