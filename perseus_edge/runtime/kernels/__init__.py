"""Native onnxruntime kernels for the `perseus` ops: a custom-op library.

    path = library()    # the built library, or None (not built, or PERSEUS_KERNELS=0)

`latent_attention.cc` computes `perseus.LatentAttention` (MLA over the latent cache) as one
kernel where the op's portable function body runs ~27 onnxruntime kernels per layer; a decode
step of a small model is bound by that count (studies/perf/README.md, section 11).
`sparse_moe.cc` computes `perseus.SparseMoE` (ort-cpu's routed and shared experts: the routing
and the selected experts, float, 8-bit or 4-bit blocks) where its body runs onnxruntime's MoE /
QMoE (sections 12-14). Both have AVX-512 loops and portable ones; on a CPU without AVX-512 (or
not x86) `library.cc` registers SparseMoE alone (section 14). `common.h` holds what they share. setup.py builds the library at install time, optionally: without a C++
compiler the install still succeeds.

The graph is the same with or without it: onnxruntime runs a registered kernel in place of the
op's function body (and inlines the body of an op the library does not register). The kernels
know the float-cache signatures (W_UK / W_UV float, or int8 with scales); onnxruntime refuses a
graph whose op has another one (an int8 cache), and the session then loads with the MoE kernel
alone (`runtime.session.create_session`).
"""

from __future__ import annotations

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def library() -> Path | None:
    """The built custom-op library beside this file; None when absent or PERSEUS_KERNELS=0."""
    if os.environ.get("PERSEUS_KERNELS") == "0":
        return None
    found = sorted(_HERE.glob("_perseus_kernels*.so")) + sorted(_HERE.glob("_perseus_kernels*.pyd"))
    return found[0] if found else None
