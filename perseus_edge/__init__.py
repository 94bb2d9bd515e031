"""perseus-edge: train, export, quantize and run small MoE-MLA-RoPE language models.

    import perseus_edge
    lm = perseus_edge.load("model-int8/")
    print(lm.generate("Once upon a time", max_new_tokens=64))

`import perseus_edge` is light: the API (and with it onnxruntime and numpy) loads on first use,
as in perseus_edge.runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "LanguageModel": "perseus_edge.api",
    "Score": "perseus_edge.api",
    "load": "perseus_edge.api",
    "PerseusError": "perseus_edge.errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from perseus_edge.api import LanguageModel, Score, load
    from perseus_edge.errors import PerseusError


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'perseus_edge' has no attribute {name!r}")
