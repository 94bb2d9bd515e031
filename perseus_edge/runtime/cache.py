"""The latent KV cache: one preallocated buffer per cache slot, updated in place by the graph.

Each buffer is a numpy array of [batch, max_context, width] allocated once, wrapped (not copied)
by an ORT OrtValue. Through IO binding the graph's `past.{i}.{slot}` input and its
`present.{i}.{slot}` output are bound to the *same* OrtValue, so each run writes only the rows of
the new tokens into memory that already holds the older ones: no per-token allocation, no copy
of the whole cache, and the numpy view always shows the current state.

MLA layers cache the latent c_kv (kv_lora_rank) and the shared RoPE key (qk_rope_head_dim) per
token, MHA layers the full K and V: `nbytes` is what `perseus info` predicts. A graph quantized
with `--kv-cache int8` has int8 slots plus a float32 `{slot}_scale` [batch, max_context, 1] buffer
beside each (GraphSpec lists them all; each buffer gets its spec's dtype and width).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from perseus_edge.runtime.session import CacheSpec


class KVCache:
    def __init__(self, specs: Sequence[CacheSpec], context: int, batch: int = 1):
        import onnxruntime as ort

        self.specs = list(specs)
        self.context = context
        self.batch = batch
        # zeros: rows past the current position are masked by the graph, but must stay finite
        self.arrays = [np.zeros((batch, context, s.width), dtype=s.dtype) for s in self.specs]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]

    def bind(self, binding, slot: int = 0, rows: int | None = None) -> list:
        """past.* and present.* of every slot -> the same OrtValue (in-place update).

        slot, rows: bind only the batch rows slot..slot+rows-1 (contiguous in memory, so the
        OrtValues wrap views of the same buffers: a run on them writes the full cache in place).
        Returns the OrtValues bound; the caller keeps them alive as long as the binding.
        """
        import onnxruntime as ort

        rows = self.batch - slot if rows is None else rows
        if slot < 0 or rows < 1 or slot + rows > self.batch:
            raise ValueError(f"cache rows {slot}..{slot + rows - 1} outside the batch of {self.batch}")
        values = (self.values if (slot, rows) == (0, self.batch)
                  else [ort.OrtValue.ortvalue_from_numpy(a[slot:slot + rows]) for a in self.arrays])
        for spec, value in zip(self.specs, values):
            binding.bind_ortvalue_input(spec.past, value)
            binding.bind_ortvalue_output(spec.present, value)
        return values

    def reset(self) -> None:
        for a in self.arrays:
            a.fill(0)

    def reset_slot(self, slot: int) -> None:
        """Zero one sequence's rows (not needed for correctness: rows past a position are masked)."""
        for a in self.arrays:
            a[slot].fill(0)

    def copy_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """Copy the first `length` cached positions (default: all) of slot `src` into slot `dst`:
        move a sequence between slots, or fork a shared prefix."""
        for a in self.arrays:
            a[dst, :length] = a[src, :length]

    def data_ptrs(self) -> list[int]:
        """Addresses of the buffers ORT reads and writes (constant for the cache's lifetime)."""
        return [v.data_ptr() for v in self.values]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def __repr__(self) -> str:
        return (f"KVCache({len(self.arrays)} buffers, batch {self.batch}, context {self.context}, "
                f"{self.nbytes / 2**20:.2f} MiB)")
