"""The ONNX Runtime session of a model folder, and the graph's interface as the session reports it.

    folder = open_folder(path)                   # perseus_edge.modelfile.reader: sha256s, config, tokenizer
    session, native = create_session(folder, threads=1, low_memory=True)  # native: perseus kernels
    spec = GraphSpec.from_session(session, folder)  # cache buffers, context, vocab, as the graph says

The graph contract (input/output names) is `perseus_edge.modelfile`; nothing here is torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from perseus_edge import modelfile as mf
from perseus_edge.errors import PerseusError
from perseus_edge.modelfile.reader import ModelFolder
from perseus_edge.runtime import kernels

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(bfloat16)": None, "tensor(double)": np.float64}
_CACHE_TYPES = {**_ORT_TYPES, "tensor(int8)": np.int8}  # int8: a quantized cache (codes + scales)


# ----------------------------------------------------------------------------- the ORT session
def default_threads() -> int:
    """ORT's own default: one intra-op thread per physical core."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:  # noqa: BLE001
        return os.cpu_count() or 1


def session_options(threads: int | None = None, low_memory: bool = False, config: dict | None = None,
                    profile: str | os.PathLike | None = None):
    """SessionOptions: `threads` intra-op threads (None = one per core), sequential execution.

    low_memory (mobile-class devices):
      - no CPU memory arena: freed activations go back to the OS instead of a growing pool
      - no memory pattern planning: no pre-sized block per input shape
      - initializers allocated with the device allocator directly (not through the arena)
      - no weight prepacking: MatMul keeps one copy of each weight instead of a packed second one
    config: extra ORT session config entries (e.g. {"session.intra_op.allow_spinning": "0"}),
    applied last so they override the defaults here; profile: a file prefix that turns on ORT's
    profiler (the trace is written by `session.end_profiling()`). These are the one seam through
    which tools (bench, profile, footprint) shape a session.
    Weights in model.onnx.data are memory-mapped by ORT where the file layout allows it.
    """
    import onnxruntime as ort

    if threads is not None and threads < 1:
        raise PerseusError(f"--threads must be at least 1, got {threads}")
    so = ort.SessionOptions()
    so.log_severity_level = 4  # fatal only: failures come back as exceptions, reported once
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle worker threads spin-wait between ops (ORT's and llama.cpp's default): a decode step is
    # ~370 tiny ops, and waking sleeping workers for each one made 2-thread decode slower than
    # 1 thread (54M int8: 1.6x faster with spinning, studies/llama_cpp/README.md). On a device
    # whose cores are busy with other work, PERSEUS_SPIN=0 makes idle workers sleep instead.
    entries = {"session.intra_op.allow_spinning": "0" if os.environ.get("PERSEUS_SPIN") == "0" else "1"}
    if low_memory:
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
        entries["session.use_device_allocator_for_initializers"] = "1"
        entries["session.disable_prepacking"] = "1"
    entries.update({str(k): str(v) for k, v in (config or {}).items()})
    for key, value in entries.items():  # each once: ORT warns when an entry is set twice
        so.add_session_config_entry(key, value)
    if profile is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile)
    return so


def create_session(folder: ModelFolder, threads: int | None = None, low_memory: bool = False,
                   config: dict | None = None, profile: str | os.PathLike | None = None):
    """(InferenceSession, native) on the CPU execution provider for the folder's graph (.onnx or
    .ort); the options are `session_options`'. The native `perseus` kernels (`runtime.kernels`)
    are registered when built; a graph whose perseus ops they do not take (onnxruntime reports a
    `perseus::` schema mismatch: the attention kernel and an int8 cache) loads with the MoE kernel
    alone, else without them; `native` says whether the library is registered."""
    def options():
        so = session_options(threads, low_memory, config, profile)
        if folder.format == "ort":
            so.add_session_config_entry("session.load_model_format", "ORT")
        return so

    session, library = None, kernels.library() if folder.format == "onnx" else None  # .ort: no functions
    # every kernel, else (a signature the attention kernel refuses: an int8 cache) the MoE kernel alone
    for only in ([None, "moe"] if library is not None else []):
        so = options()
        if only:
            so.add_session_config_entry("perseus.kernels", only)
        try:
            so.register_custom_ops_library(str(library))
        except Exception:  # noqa: BLE001 - not loadable here (another platform's build): the bodies run
            break
        session = _load(folder, so, may_refuse=True)
        if session is not None:
            break
    native = session is not None
    if session is None:
        session = _load(folder, options())
    if folder.format == "onnx":
        release_mapped_pages(folder.path / mf.MODEL_DATA)
    return session, native


def _load(folder: ModelFolder, so, may_refuse: bool = False):
    """The InferenceSession; None if `may_refuse` and onnxruntime refused a perseus op's signature
    (the native kernels registered in `so` do not take it); any other failure is one line."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(folder.graph), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types, all with a message
        if may_refuse and "schema(perseus::" in str(e):
            return None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first)
        raise PerseusError(f"onnxruntime cannot load {folder.graph}: {first}") from None


def release_mapped_pages(path: Path) -> int:
    """Drop this process's resident pages of the memory-mapped weight file `path` (Linux).

    ORT maps model.onnx.data and reads every weight once while it builds the session; the
    weights it prepacks into its own buffers are never read from the mapping again, yet their
    pages stay resident and count in the process's RSS (54M int8: 9 MiB). madvise(MADV_DONTNEED)
    on a mapping none of whose pages were written (no anonymous copy-on-write pages, checked in
    smaps) only unmaps the pages: whatever a kernel still reads (embedding rows, norms) is faulted
    back in from the page cache on first use. Returns the number of mappings released.
    """
    import ctypes

    smaps = Path("/proc/self/smaps")
    if not path.is_file() or not smaps.is_file():
        return 0
    target, ranges, current = str(path.resolve()), [], None
    for line in smaps.read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            current = fields[0] if len(fields) == 6 and fields[5] == target else None
        elif current and fields[0] == "Anonymous:" and fields[1] == "0":  # no copy-on-write pages
            ranges.append([int(x, 16) for x in current.split("-")])
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return sum(madvise(start, end - start, 4) == 0 for start, end in ranges)  # 4: MADV_DONTNEED


# ----------------------------------------------------------------------------- graph contract
@dataclass
class CacheSpec:
    past: str  # input name, e.g. past.0.c_kv
    present: str  # output name bound to the same buffer
    width: int  # last dimension
    dtype: type


@dataclass
class GraphSpec:
    """The graph's interface as ORT reports it, checked against `perseus_edge.modelfile`."""

    caches: list[CacheSpec] = field(default_factory=list)
    max_context: int = 0
    vocab_size: int = 0
    logits_dtype: type = np.float32
    logits_rows: bool = False  # the graph takes mf.LOGITS_ROWS (folders exported before it do not)

    @classmethod
    def from_session(cls, session, folder: ModelFolder) -> "GraphSpec":
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        where = folder.graph
        for name in (mf.INPUT_IDS, mf.POSITION):
            if name not in inputs:
                raise PerseusError(f"{where} has no input {name!r}: not a perseus graph")
        if mf.LOGITS not in outputs:
            raise PerseusError(f"{where} has no output {mf.LOGITS!r}: not a perseus graph")
        cfg = folder.config
        caches, contexts = [], set()
        for layer in range(cfg.num_hidden_layers):
            for slot in mf.cache_slots(cfg.is_mla):
                # an int8 cache (perseus quantize --kv-cache int8) has a per-row scale buffer beside each slot
                scale = mf.cache_scale_slot(slot)
                slots = [slot, scale] if mf.past_name(layer, scale) in inputs else [slot]
                for name in slots:
                    past, present = mf.past_name(layer, name), mf.present_name(layer, name)
                    if past not in inputs or present not in outputs:
                        raise PerseusError(f"{where} lacks cache {past} / {present} "
                                           f"(config.json and graph disagree)")
                    shape, kind = inputs[past].shape, inputs[past].type
                    dtype = _CACHE_TYPES.get(kind)
                    if dtype is None or len(shape) != 3 or not isinstance(shape[2], int):
                        raise PerseusError(f"{where}: cache input {past} is {kind} {shape}, "
                                           f"expected float or int8 [batch, context, width]")
                    if isinstance(shape[1], int):
                        contexts.add(shape[1])
                    caches.append(CacheSpec(past, present, shape[2], dtype))
        unknown = sorted(set(inputs) - {mf.INPUT_IDS, mf.POSITION, mf.LOGITS_ROWS} - {c.past for c in caches})
        if unknown:
            raise PerseusError(f"{where} has inputs {', '.join(unknown[:3])} that config.json does not "
                               f"describe (config.json and graph disagree)")
        if len(contexts) > 1:
            raise PerseusError(f"{where}: cache inputs disagree on the context length {sorted(contexts)}")
        max_context = (contexts.pop() if contexts
                       else int(folder.generation.get("max_context") or cfg.max_position_embeddings))
        vshape = outputs[mf.LOGITS].shape
        vocab = vshape[-1] if vshape and isinstance(vshape[-1], int) else cfg.vocab_size
        if vocab != cfg.vocab_size:
            raise PerseusError(f"{where}: logits have {vocab} entries but config.json says "
                               f"vocab_size {cfg.vocab_size}")
        logits_dtype = _ORT_TYPES.get(outputs[mf.LOGITS].type) or np.float32
        return cls(caches, max_context, vocab, logits_dtype, mf.LOGITS_ROWS in inputs)
