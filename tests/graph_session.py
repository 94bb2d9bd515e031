"""A minimal onnxruntime decoder over an exported graph: the export tests' check of the graph
contract, independent of the runtime it is also a reference for.

The cache is bound the way the runtime binds it: each `past.{i}.{slot}` input and its
`present.{i}.{slot}` output share one preallocated OrtValue, so TensorScatter writes the new rows
in place and a step copies nothing else. (The full runtime is `perseus_edge.runtime`; this is
the smallest thing that exercises the graph contract.) Torch-free.
"""

from __future__ import annotations

import os

import numpy as np

from perseus_edge import modelfile as mf


class CachedSession:
    """`session(ids [B,T], position | positions [B]) -> logits [B,T,V]`, cache rows updated in place."""

    def __init__(self, model: str | os.PathLike | bytes, batch: int = 1, threads: int | None = None,
                 inplace: bool = True, library: str | os.PathLike | None = None):
        """inplace=False binds each present.* to a fresh output instead (so TensorScatter copies
        the whole cache every step): only to measure what the in-place binding saves.
        library: a custom-op library to register (the native perseus kernels); None runs the
        perseus ops' function bodies."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        if library is not None:
            so.register_custom_ops_library(str(library))
        model = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        self.binding = self.session.io_binding()
        self.binding.bind_output(mf.LOGITS)  # first, so it is output 0
        self.caches: dict[str, np.ndarray] = {}
        self.inputs = {i.name for i in self.session.get_inputs()}
        for inp in self.session.get_inputs():
            if not inp.name.startswith("past."):
                continue
            _, layer, slot = inp.name.split(".")
            buffer = np.zeros((batch, inp.shape[1], inp.shape[2]), np.float32)
            value = ort.OrtValue.ortvalue_from_numpy(buffer)  # wraps `buffer`, no copy
            self.binding.bind_ortvalue_input(inp.name, value)
            present = mf.present_name(int(layer), slot)
            if inplace:
                self.binding.bind_ortvalue_output(present, value)
            else:
                self.binding.bind_output(present)
            self.caches[inp.name] = buffer

    @property
    def max_context(self) -> int:
        return next(iter(self.caches.values())).shape[1]

    def __call__(self, ids: np.ndarray, position) -> np.ndarray:
        """position: an int for every row, or one position per row [B]."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.binding.bind_cpu_input(mf.INPUT_IDS, ids)
        self.binding.bind_cpu_input(mf.POSITION, np.ascontiguousarray(
            np.broadcast_to(np.asarray(position, np.int64), ids.shape[:1])))
        if mf.LOGITS_ROWS in self.inputs:  # every new token's logits
            self.binding.bind_cpu_input(mf.LOGITS_ROWS, np.arange(ids.shape[1], dtype=np.int64))
        self.binding.bind_output(mf.LOGITS)  # logits change shape between prefill and decode
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[0].numpy()

    def greedy(self, prompt: np.ndarray, steps: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Prefill `prompt` [B,T], then `steps` greedy decode steps; returns (logits per call, tokens)."""
        logits = [self(prompt, 0)]
        tokens, position = [], prompt.shape[1]
        for _ in range(steps):
            nxt = logits[-1][:, -1].argmax(-1)[:, None]
            tokens.append(nxt)
            logits.append(self(nxt, position))
            position += 1
        return logits, np.concatenate(tokens, axis=1) if tokens else np.zeros((prompt.shape[0], 0), np.int64)
