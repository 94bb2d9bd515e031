"""perseus_edge.runtime: run an exported model folder with onnxruntime + numpy + tokenizers only.

    from perseus_edge.runtime import Generator
    gen = Generator("model-dir", threads=1)
    print(gen.generate("Once upon a time", max_new_tokens=64, temperature=0).text)

Modules, one job each (llama2.c's run.c, in Python over ONNX Runtime):
    session    the ORT session of a folder opened by `perseus_edge.modelfile.reader.open_folder`
               (manifest sha256s, config, tokenizer, vocab), and the graph's interface
    cache      preallocated KV/latent cache buffers, bound in place (past.* == present.*)
    model      Model.forward(ids, positions, slot) -> logits: the only call that does math
    stream     incremental UTF-8-correct detokenisation, stop-string filter
    generate   Generator: prefill + decode loop, context policy, Result with timings
    timings    tok/s, time to first token, peak RSS; the llama.cpp-style report
    evaluate   perplexity over sequential windows (what `perseus eval` runs for ONNX folders)

Sampling (`perseus_edge.sampling.Sampler`) sits one floor down, shared with the PyTorch reference.

Nothing here imports torch. Names are imported lazily so `import perseus_edge.runtime` is cheap.
"""

from __future__ import annotations

_EXPORTS = {
    "Generator": "perseus_edge.runtime.generate",
    "Result": "perseus_edge.runtime.generate",
    "Model": "perseus_edge.runtime.model",
    "Sampler": "perseus_edge.sampling",
    "TextStream": "perseus_edge.runtime.stream",
    "Timings": "perseus_edge.runtime.timings",
    "evaluate": "perseus_edge.runtime.evaluate",
    "open_folder": "perseus_edge.modelfile.reader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'perseus_edge.runtime' has no attribute {name!r}")
