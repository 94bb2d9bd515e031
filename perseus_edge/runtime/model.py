"""The model at run time: folder + ORT session + cache, and `forward`, the one call that does math.

Like llama2.c's `forward(transformer, token, pos)`: it takes token ids and the absolute position
of the first one, runs the graph (which appends their cache rows in place) and returns logits.
Everything it binds is preallocated; a decode step allocates nothing.
"""

from __future__ import annotations

import os

import numpy as np

from perseus_edge import modelfile as mf
from perseus_edge.errors import PerseusError
from perseus_edge.runtime.cache import KVCache
from perseus_edge.runtime.session import (GraphSpec, ModelFolder, create_session, default_threads,
                                          open_folder)


class Model:
    """A loaded model folder, ready to run: `forward(ids, position) -> logits`."""

    def __init__(self, folder: ModelFolder | str | os.PathLike, threads: int | None = None,
                 low_memory: bool = False, batch: int = 1, format: str = "auto", verify: bool = True):
        self.folder = (folder if isinstance(folder, ModelFolder)
                       else open_folder(folder, format=format, verify=verify))
        self.threads = threads or default_threads()
        self.low_memory = low_memory
        self.session = create_session(self.folder, threads, low_memory)
        self.spec = GraphSpec.from_session(self.session, self.folder)
        self.batch = batch
        self.cache = KVCache(self.spec.caches, self.spec.max_context, batch)
        self.binding = self.session.io_binding()
        self.cache.bind(self.binding)
        # decode step buffers: written in place each step, bound once
        import onnxruntime as ort

        self._ids1 = np.zeros((batch, 1), dtype=np.int64)
        self._pos = np.zeros((1,), dtype=np.int64)
        self._logits1 = np.zeros((batch, 1, self.spec.vocab_size), dtype=self.spec.logits_dtype)
        self._ids1_v = ort.OrtValue.ortvalue_from_numpy(self._ids1)
        self._pos_v = ort.OrtValue.ortvalue_from_numpy(self._pos)
        self._logits1_v = ort.OrtValue.ortvalue_from_numpy(self._logits1)
        self.binding.bind_ortvalue_input(mf.POSITION, self._pos_v)
        self._step_bound = False

    @property
    def config(self):
        return self.folder.config

    @property
    def tokenizer(self):
        return self.folder.tokenizer

    @property
    def max_context(self) -> int:
        return self.spec.max_context

    def forward(self, ids: np.ndarray, position: int) -> np.ndarray:
        """Logits [batch, seq, vocab] for `ids` [batch, seq] at absolute positions position.. .

        The cache rows position..position+seq-1 are written in place; rows before `position` must
        hold this sequence's earlier tokens. The returned array for a one-token step is a view of
        a buffer that the next step overwrites: copy it to keep it.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch or ids.shape[1] < 1:
            raise ValueError(f"ids must be [{self.batch}, seq>=1], got {ids.shape}")
        seq = ids.shape[1]
        if position < 0 or position + seq > self.max_context:
            raise PerseusError(f"{position + seq} tokens exceed the model's context of {self.max_context}")
        self._pos[0] = position
        if seq == 1:
            self._ids1[:] = ids
            if not self._step_bound:
                self.binding.bind_ortvalue_input(mf.INPUT_IDS, self._ids1_v)
                self.binding.bind_ortvalue_output(mf.LOGITS, self._logits1_v)
                self._step_bound = True
            logits = self._logits1
        else:
            import onnxruntime as ort

            logits = np.empty((self.batch, seq, self.spec.vocab_size), dtype=self.spec.logits_dtype)
            self.binding.bind_ortvalue_input(mf.INPUT_IDS, ort.OrtValue.ortvalue_from_numpy(ids))
            self.binding.bind_ortvalue_output(mf.LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
            self._step_bound = False
        try:
            self.session.run_with_iobinding(self.binding)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PerseusError(f"onnxruntime failed running {self.folder.graph}: {first}") from None
        return logits

    def __repr__(self) -> str:
        return (f"Model({self.folder.path}, {self.folder.format}, context {self.max_context}, "
                f"threads {self.threads}, low_memory {self.low_memory}, {self.cache!r})")
