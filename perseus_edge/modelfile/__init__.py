"""The model folder: one library for its names, graph helpers, writer and reader (gguf-py's shape).

    names    every file name, graph input/output and manifest key (`from perseus_edge import
             modelfile as mf; mf.MODEL_ONNX`): re-exported here, torch- and onnx-free
    program  `Program`: a model folder in memory (graph + config + tokenizer + metadata), the
             artifact the compiler's stages hand on
    graph    onnx helpers: `Builder`, `ensure_opset`, `drop_unused`, ... (needs onnx)
    writer   `save(program, folder)`: the folder written atomically, checked, with its manifest
    reader   `open_folder(path)` (small files, sha256 verified; onnx-free, what the runtime uses)
             and `load(path) -> Program` (graph included; needs onnx)

Importing this package loads only the names; the other modules are imported where needed.
"""

from perseus_edge.modelfile.names import *  # noqa: F401,F403
from perseus_edge.modelfile.names import __all__  # noqa: F401
