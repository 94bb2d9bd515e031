"""Write a model folder (layout in `perseus_edge.modelfile.names`).

The caller hands in a fresh directory (the temp side of `manifest.atomic_folder`), so a failed
write never leaves a half-written model where a good one is expected.

Weights over EXTERNAL_BYTES go to model.onnx.data with every tensor at a 4 KiB-aligned offset:
that alignment is what lets onnxruntime memory-map them instead of reading them into RAM.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import TensorProto

from perseus_edge.modelfile import names as mf
from perseus_edge.errors import PerseusError
from perseus_edge.manifest import write_manifest
from perseus_edge.model.config import ModelConfig
from perseus_edge.tokenizer import EOS, PAD, load_tokenizer

EXTERNAL_BYTES = 2 << 20  # above ~2 MB of weights the graph gets an external data file
INLINE_TENSOR_BYTES = 1024  # tensors this small stay in model.onnx
ALIGN = 4096  # the page size: ORT maps external data whose offsets are page-aligned
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.0}


def save_graph(model: onnx.ModelProto, folder: Path) -> None:
    """model.onnx (+ model.onnx.data). Moves the tensors of `model` into the data file."""
    tensors = [t for t in model.graph.initializer if len(t.raw_data) > INLINE_TENSOR_BYTES]
    if sum(len(t.raw_data) for t in tensors) > EXTERNAL_BYTES:
        with open(folder / mf.MODEL_DATA, "wb") as f:
            for t in tensors:
                f.write(b"\0" * (-f.tell() % ALIGN))
                offset, length = f.tell(), len(t.raw_data)
                f.write(t.raw_data)
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                for key, value in (("location", mf.MODEL_DATA), ("offset", offset), ("length", length)):
                    t.external_data.add(key=key, value=str(value))
    onnx.save_model(model, folder / mf.MODEL_ONNX)


def generation_config(tokenizer_path: Path, max_context: int) -> dict:
    """Runtime defaults: context length, end-of-text id from the tokenizer, sampling settings."""
    tok = load_tokenizer(tokenizer_path)
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    if eos is None:
        raise PerseusError(f"{tokenizer_path} has no {EOS} token: the runtime could not stop generating")
    return {"max_context": max_context, "eos_token_id": eos, "pad_token_id": pad, "do_sample": True,
            **SAMPLING}


def save_folder(folder: Path, model: onnx.ModelProto, cfg: ModelConfig, tokenizer_path: Path,
                max_context: int, export_meta: dict) -> None:
    """Every file of the model folder, then manifest.json (sha256 of each, plus `export_meta`)."""
    folder = Path(folder)
    gen = generation_config(tokenizer_path, max_context)
    save_graph(model, folder)
    (folder / mf.CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    (folder / mf.TOKENIZER).write_bytes(Path(tokenizer_path).read_bytes())
    (folder / mf.GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
    write_manifest(folder, mf.KIND_ONNX, {mf.EXPORT_META: export_meta})
