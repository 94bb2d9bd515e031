"""llama.cpp as a `perseus bench` backend: a .gguf file run through llama-cpp-python's low-level API.

Only the C calls llama-bench itself makes (`llama_decode` on a one-sequence batch, then
`llama_synchronize`), no sampling and no high-level `Llama` object, so the timing is the
engine's. Needs `pip install 'perseus-edge[llama]'` (llama-cpp-python, a ~10-20 min native
build; kept out of CI).
"""

from __future__ import annotations

import ctypes

import numpy as np

from perseus_edge.errors import PerseusError

BATCH = 512  # tokens per llama_decode call: llama-bench's (and llama.cpp's) default n_ubatch


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def require() -> None:
    if not available():
        raise PerseusError("a .gguf model needs llama-cpp-python: pip install 'perseus-edge[llama]' "
                           "(a native build of ~10-20 min)")


class LlamaCppBackend:
    name = "llama.cpp"

    def __init__(self, path: str, threads: int, n_ctx: int, prompt: np.ndarray):
        import llama_cpp as L

        self.L = L
        self.version = getattr(L, "__version__", "?")
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = max(n_ctx, 1)
        cp.n_batch = cp.n_ubatch = BATCH
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp cannot create a context of {n_ctx} tokens for {path}")
        self.memory = L.llama_get_memory(self.ctx)
        self.max_context = L.llama_n_ctx(self.ctx)
        self.size_bytes = L.llama_model_size(self.model)
        self.params = L.llama_model_n_params(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        # the whole prompt as one C array: each step passes a pointer into it, nothing is copied
        self.tokens = (L.llama_token * len(prompt))(*[int(t) for t in prompt])
        self.token_p = ctypes.POINTER(L.llama_token)
        self.base = ctypes.addressof(self.tokens)
        self.valid = 0  # leading cache positions that hold prompt[:valid]
        self.chunk = BATCH  # prompt tokens per llama_decode call, as llama-bench feeds them

    def reset(self, depth: int) -> None:
        """Leave exactly prompt[:depth] in the cache: drop the cells at positions >= depth, and
        decode the missing part of the prefix when an earlier, shallower test removed it
        (unlike the ONNX cache's rows, llama.cpp's cells go away with `llama_memory_seq_rm`)."""
        self.L.llama_memory_seq_rm(self.memory, 0, depth, -1)
        self.valid = min(self.valid, depth)
        for s in range(self.valid, depth, BATCH):
            self.forward(s, min(s + BATCH, depth))
        last = self.L.llama_memory_seq_pos_max(self.memory, 0)
        if last != depth - 1:
            raise RuntimeError(f"llama.cpp's cache ends at position {last}, expected {depth - 1}")

    def forward(self, start: int, stop: int) -> None:
        """Decode prompt[start:stop] at positions start..: a one-sequence batch continues from the
        cache's last position, which `reset` (or the previous call) left at start - 1."""
        L = self.L
        ptr = ctypes.cast(self.base + ctypes.sizeof(L.llama_token) * start, self.token_p)
        rc = L.llama_decode(self.ctx, L.llama_batch_get_one(ptr, stop - start))
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} at position {start}")
        L.llama_synchronize(self.ctx)
        self.valid = stop
