"""The model at run time: folder + ORT session + cache, and `forward`, the one call that does math.

Like llama2.c's `forward(transformer, token, pos)`: it takes token ids and the absolute position
of the first one, runs the graph (which appends their cache rows in place) and returns logits.
Everything it binds is preallocated; a decode step allocates nothing.

Several sequences (a server): `Model(folder, batch=N)` holds N cache slots, one per sequence.
`forward(ids [n, T], positions [n], slot=s)` runs the sequences in slots s..s+n-1 together, each
at its own position (the graph's per-row `position` input): row b writes its cache rows
positions[b].. and attends to its own rows 0..positions[b]+t only. Slots are contiguous rows of
one buffer, so any contiguous run of slots is bound in place without copying; keep the sequences
to decode together in adjacent slots (`copy_slot` moves a sequence, e.g. to close a gap when one
finishes). A finished slot is reused by prefilling the next sequence from position 0; stale rows
beyond a position are masked, so `reset_slot` is optional.
"""

from __future__ import annotations

import os

import numpy as np

from perseus_edge import modelfile as mf
from perseus_edge.errors import PerseusError
from perseus_edge.runtime.cache import KVCache
from perseus_edge.modelfile.reader import ModelFolder, open_folder
from perseus_edge.runtime.session import GraphSpec, create_session, default_threads

# Prompt tokens per graph run (`Model.prefill_chunk`). The chunk bounds the activations, which grow
# with chunk x cached rows (attention scores [chunk * heads, rows]): 54M int8, 768 cached tokens
# then pp256, peak RSS 310 MiB in chunks of 512, 236 of 256, 174 of 64, at the same prompt speed
# (studies/perf/README.md, section 7). Unquantized fp32 weights run taller GEMMs faster (+9-17%
# prompt speed from 64 to 128 rows at the start of a context, section 8), and their own size
# dwarfs the extra activations (+9-15 MiB peak).
PREFILL_CHUNK = 64
PREFILL_CHUNK_FP32 = 128
PREFILL_CHUNK_LOW_MEMORY = 32


class _Rows:
    """An IO binding over cache slots slot..slot+n-1, with its preallocated one-token buffers."""

    def __init__(self, model: "Model", slot: int, n: int):
        import onnxruntime as ort

        self.binding = model.session.io_binding()
        self.values = model.cache.bind(self.binding, slot, n)  # kept alive with the binding
        self.ids = np.zeros((n, 1), dtype=np.int64)
        self.pos = np.zeros((n,), dtype=np.int64)
        self.logits = np.zeros((n, 1, model.spec.vocab_size), dtype=model.spec.logits_dtype)
        self.first_row = np.zeros((1,), dtype=np.int64)  # logits_rows of a one-token step
        self._ids_v, self._pos_v, self._logits_v, self._first_row_v = (
            ort.OrtValue.ortvalue_from_numpy(a) for a in (self.ids, self.pos, self.logits, self.first_row))
        self.binding.bind_ortvalue_input(mf.POSITION, self._pos_v)
        self.logits_rows = model.spec.logits_rows
        self.step_bound = False

    def bind_step(self) -> None:
        if not self.step_bound:
            self.binding.bind_ortvalue_input(mf.INPUT_IDS, self._ids_v)
            self.binding.bind_ortvalue_output(mf.LOGITS, self._logits_v)
            if self.logits_rows:
                self.binding.bind_ortvalue_input(mf.LOGITS_ROWS, self._first_row_v)
            self.step_bound = True

    def bind_prefill(self, ids: np.ndarray, rows: np.ndarray, logits: np.ndarray) -> None:
        import onnxruntime as ort

        self.binding.bind_ortvalue_input(mf.INPUT_IDS, ort.OrtValue.ortvalue_from_numpy(ids))
        if self.logits_rows:
            self.binding.bind_ortvalue_input(mf.LOGITS_ROWS, ort.OrtValue.ortvalue_from_numpy(rows))
        self.binding.bind_ortvalue_output(mf.LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        self.step_bound = False


class Model:
    """A loaded model folder, ready to run: `forward(ids, positions) -> logits`.

    threads, low_memory, session_config (extra ORT session config entries) and profile (a file
    prefix turning on ORT's profiler; `end_profiling()` writes the trace) shape the session:
    tools create their sessions through these, not around them.
    """

    def __init__(self, folder: ModelFolder | str | os.PathLike, threads: int | None = None,
                 low_memory: bool = False, batch: int = 1, format: str = "auto", verify: bool = True,
                 session_config: dict | None = None, profile: str | os.PathLike | None = None):
        self.folder = (folder if isinstance(folder, ModelFolder)
                       else open_folder(folder, format=format, verify=verify))
        self.threads = threads or default_threads()
        self.low_memory = low_memory
        if batch < 1:
            raise PerseusError(f"batch must be at least 1, got {batch}")
        # native_kernels: the perseus ops run as the native library's kernels (runtime.kernels)
        self.session, self.native_kernels = create_session(self.folder, threads, low_memory, session_config, profile)
        fp32 = self.folder.manifest.get("kind") == mf.KIND_ONNX  # quantized folders are onnx-<scheme>
        self.prefill_chunk = (PREFILL_CHUNK_LOW_MEMORY if low_memory
                              else PREFILL_CHUNK_FP32 if fp32 else PREFILL_CHUNK)
        self.spec = GraphSpec.from_session(self.session, self.folder)
        self.batch = batch
        self.cache = KVCache(self.spec.caches, self.spec.max_context, batch)
        self._rows: dict[tuple[int, int], _Rows] = {}
        self._all = self._bound(0, batch)

    @property
    def config(self):
        return self.folder.config

    @property
    def tokenizer(self):
        return self.folder.tokenizer

    @property
    def max_context(self) -> int:
        return self.spec.max_context

    @property
    def binding(self):
        """The IO binding of all slots (past.* and present.* bound to the cache buffers)."""
        return self._all.binding

    def _bound(self, slot: int, n: int) -> _Rows:
        rows = self._rows.get((slot, n))
        if rows is None:
            if slot < 0 or slot + n > self.batch:
                raise ValueError(f"slots {slot}..{slot + n - 1} outside the model's batch of {self.batch}")
            rows = self._rows[(slot, n)] = _Rows(self, slot, n)
        return rows

    def forward(self, ids: np.ndarray, positions, slot: int = 0, last_only: bool = False) -> np.ndarray:
        """Logits [n, seq, vocab] for `ids` [n, seq] in cache slots slot..slot+n-1; [n, 1, vocab]
        (the last token's) with last_only, which is all a generation's prefill needs: the graph
        then runs the output head on that row alone.

        positions: an int (every row at that position) or one absolute position per row [n]:
        row b's cache rows positions[b]..positions[b]+seq-1 are written in place, and its rows
        before positions[b] must hold that sequence's earlier tokens. The returned array for a
        one-token step is a view of a buffer that the next step on the same slots overwrites:
        copy it to keep it.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] < 1 or not 1 <= ids.shape[0] <= self.batch:
            raise ValueError(f"ids must be [1..{self.batch}, seq>=1], got {ids.shape}")
        n, seq = ids.shape
        rows = self._all if (slot, n) == (0, self.batch) else self._bound(slot, n)
        if isinstance(positions, (int, np.integer)):
            first = last = int(positions)
            rows.pos.fill(first)
        else:
            p = np.asarray(positions)
            if p.shape != (n,) or p.dtype.kind not in "iu":
                raise ValueError(f"positions must be an int or {n} ints, got {p.dtype} {p.shape}")
            first, last = int(p.min()), int(p.max())
            rows.pos[:] = p
        if first < 0:
            raise PerseusError(f"negative position {first}")
        if last + seq > self.max_context:
            raise PerseusError(f"{last + seq} tokens exceed the model's context of {self.max_context}")
        if seq == 1:
            rows.ids[:] = ids
            rows.bind_step()
            logits = rows.logits
        else:
            wanted = np.arange(seq - 1 if last_only else 0, seq, dtype=np.int64)
            out_rows = len(wanted) if self.spec.logits_rows else seq
            logits = np.empty((n, out_rows, self.spec.vocab_size), dtype=self.spec.logits_dtype)
            rows.bind_prefill(ids, wanted, logits)
        try:
            self.session.run_with_iobinding(rows.binding)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PerseusError(f"onnxruntime failed running {self.folder.graph}: {first}") from None
        return logits[:, -1:] if last_only else logits

    def copy_slot(self, src: int, dst: int, length: int | None = None) -> None:
        """Copy a sequence's first `length` cached positions (default: all) from slot src to dst."""
        self.cache.copy_slot(src, dst, length)

    def reset_slot(self, slot: int) -> None:
        """Zero one slot's cache rows."""
        self.cache.reset_slot(slot)

    def end_profiling(self) -> str:
        """Stop ORT's profiler (Model(profile=...)) and return the trace file's path."""
        return self.session.end_profiling()

    def __repr__(self) -> str:
        return (f"Model({self.folder.path}, {self.folder.format}, context {self.max_context}, "
                f"threads {self.threads}, low_memory {self.low_memory}, native kernels {self.native_kernels}, "
                f"{self.cache!r})")
