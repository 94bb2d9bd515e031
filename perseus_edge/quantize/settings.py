"""Schemes, instruction sets and the resolved plan of one `perseus quantize` run (no onnx import).

Instruction-set (`--isa`) settings follow optimum's `AutoQuantizationConfig` for dynamic int8 (activations uint8
per tensor, weights int8 symmetric per channel) and onnxruntime's advice for its kernels:

| isa         | int8 weights        | reduce_range | int4 MatMulNBits accuracy_level |
|-------------|---------------------|--------------|---------------------------------|
| avx512_vnni | int8 (u8 x s8 VNNI) | no           | 4 (int8 activations, VNNI dot products) |
| avx512      | int8                | yes (7-bit: VPMADDUBSW saturation without VNNI) | 4 |
| avx2        | uint8, zero point 128 (optimum's avx2: u8 x u8) | yes | 4 |
| arm64       | int8 (u8 x s8)      | no           | 4 (SDOT/UDOT or I8MM kernels)   |

avx512_vnni and arm64 give the same bits (as optimum's two configs do); onnxruntime picks the
instruction set at run time, so one int8 folder serves both.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass

from perseus_edge.errors import PerseusError
from perseus_edge.modelfile.names import TARGETS

SCHEMES = ("int8", "int4", "fp16", "fp32")
KV_CACHES = ("fp32", "int8")
TABLE_CHOICES = ("fp32", "int8", "int4")
INT4_METHODS = ("rtn", "hqq")
FORMATS = ("qoperator", "qdq")


@dataclass(frozen=True)
class Isa:
    unsigned_int8: bool
    reduce_range: bool
    accuracy_level: int


ISAS = {
    "avx512_vnni": Isa(unsigned_int8=False, reduce_range=False, accuracy_level=4),
    "avx512": Isa(unsigned_int8=False, reduce_range=True, accuracy_level=4),
    "avx2": Isa(unsigned_int8=True, reduce_range=True, accuracy_level=4),
    "arm64": Isa(unsigned_int8=False, reduce_range=False, accuracy_level=4),
}

# Lowering targets whose kernels take the perseus.MoE weights in their own layout: for these the
# quantizer leaves the op's inputs in float and records the experts' settings, and `lower`
# quantizes them for the kernel (ort-cpu: com.microsoft.QMoE).
KERNEL_EXPERTS = ("ort-cpu",)

# what the embedding table and the LM head get by default, per scheme (measured: README.md)
DEFAULT_TABLES = {"int8": ("int8", "int8"), "int4": ("int4", "int4"), "fp16": ("fp32", "fp32"),
                  "fp32": ("fp32", "fp32")}


def host_isa() -> str:
    """The instruction set of the machine running this: arm64, or the best x86 level its CPU reports."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return "arm64"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "avx512_vnni"
    if "avx512bw" in flags:
        return "avx512"
    return "avx2"


def resolve_isa(isa: str | None) -> str:
    if isa in (None, "", "auto"):
        return host_isa()
    if isa not in ISAS:
        raise PerseusError(f"unknown isa {isa!r} (choose from auto, {', '.join(ISAS)})")
    return isa


@dataclass
class Plan:
    """Every setting of one run, validated; stored in the manifest under `quantization`."""

    scheme: str
    isa: str = "auto"
    target: str = "portable"  # the lowering target the program is quantized for
    kv_cache: str = "fp32"
    block_size: int = 32
    method: str = "rtn"
    embeddings: str | None = None
    lm_head: str | None = None
    accuracy_level: int | None = None  # MatMulNBits / QMoE; None: the isa's
    format: str = "qoperator"  # int4: quantized ops in the graph / function bodies, or qdq weights

    @classmethod
    def make(cls, scheme: str, isa: str | None = "auto", target: str = "portable", kv_cache: str = "fp32",
             block_size: int = 32, method: str = "rtn", embeddings: str | None = None, lm_head: str | None = None,
             accuracy_level: int | None = None, format: str = "qoperator", **unknown) -> "Plan":
        if unknown:
            raise PerseusError(f"unknown quantization option(s): {', '.join(sorted(unknown))}")
        if scheme not in SCHEMES:
            raise PerseusError(f"unknown scheme {scheme!r} (choose from {', '.join(SCHEMES)})")
        if kv_cache not in KV_CACHES:
            raise PerseusError(f"unknown --kv-cache {kv_cache!r} (choose from {', '.join(KV_CACHES)})")
        if scheme == "fp32" and kv_cache == "fp32":
            raise PerseusError("scheme fp32 leaves the weights as they are: it only makes sense with --kv-cache int8")
        if method not in INT4_METHODS:
            raise PerseusError(f"unknown method {method!r} (choose from {', '.join(INT4_METHODS)})")
        if block_size < 16 or block_size & (block_size - 1):
            raise PerseusError(f"--block-size must be a power of two >= 16, got {block_size}")
        default_embed, default_head = DEFAULT_TABLES[scheme]
        embeddings, lm_head = embeddings or default_embed, lm_head or default_head
        for name, value in (("embeddings", embeddings), ("lm-head", lm_head)):
            if value not in TABLE_CHOICES:
                raise PerseusError(f"unknown --{name} {value!r} (choose from {', '.join(TABLE_CHOICES)})")
            if scheme in ("fp16", "fp32") and value != "fp32":
                raise PerseusError(f"--{name} {value} needs scheme int8 or int4")
        if format not in FORMATS:
            raise PerseusError(f"unknown --format {format!r} (choose from {', '.join(FORMATS)})")
        if format == "qdq" and (scheme != "int4" or method != "rtn"):
            raise PerseusError("--format qdq writes int4 rtn weights: use it with --scheme int4 --method rtn")
        if accuracy_level not in (None, 0, 1, 4):
            raise PerseusError(f"accuracy_level must be 0, 1 or 4, got {accuracy_level}")
        if target not in TARGETS:
            raise PerseusError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
        isa = resolve_isa(isa)
        if accuracy_level is None:
            accuracy_level = ISAS[isa].accuracy_level
        return cls(scheme, isa, target, kv_cache, block_size, method, embeddings, lm_head, accuracy_level,
                   format)

    @property
    def settings(self) -> Isa:
        return ISAS[self.isa]

    @property
    def kernel_experts(self) -> bool:
        """Whether the target's lowering quantizes the perseus.MoE experts (not this stage)."""
        return self.target in KERNEL_EXPERTS

    @property
    def kind_suffix(self) -> str:
        return self.scheme + ("-kv8" if self.kv_cache == "int8" else "")

    def to_dict(self) -> dict:
        return asdict(self)
