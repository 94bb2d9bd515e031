"""`Program`: a model folder in memory, the artifact every compiler stage takes and returns.

    export(checkpoint) -> Program -> quantize(program, scheme) -> lower(program, target) -> save(program, folder)

Like ExecuTorch's exported program between `export`, `quantize` and `to_backend`: each stage is a
plain function of a Program that can be inspected (`program.graph` is the onnx ModelProto with its
weights loaded) before the next one runs. `records` holds what each stage did, keyed as in the
manifest (export, quantization, lowering), and is written into manifest.json by `writer.save`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from perseus_edge.model.config import ModelConfig
from perseus_edge.modelfile import names as mf


@dataclass
class Program:
    graph: object  # onnx.ModelProto, weights loaded
    config: ModelConfig
    tokenizer: bytes  # tokenizer.json
    generation: dict  # generation_config.json
    kind: str = mf.KIND_ONNX  # manifest kind: onnx, onnx-<scheme>[-kv8]
    records: dict = field(default_factory=dict)  # manifest keys: export, quantization, lowering, ...

    @property
    def target(self) -> str:
        """The target the graph is lowered for ("portable" until `lower` runs)."""
        return (self.records.get(mf.LOWER_META) or {}).get("target", "portable")

    @property
    def quantized(self) -> bool:
        return mf.QUANT_META in self.records
