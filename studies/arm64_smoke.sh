#!/usr/bin/env bash
# arm64 (aarch64) smoke test of the torch-free runtime, on an x86 host, under qemu-user.
#
#   studies/arm64_smoke.sh            # writes studies/results/arm64/smoke.txt; exit 1 on a mismatch
#
# 1. host tools      debootstrap + qemu-user-static (apt-get, Debian)
# 2. arm64 root      debootstrap --arch=arm64 --foreign (minbase + python3). The second stage
#                    needs binfmt_misc; where it is not registered (containers), the downloaded
#                    .debs are unpacked with dpkg-deb instead, which is all a Python needs.
# 3. wheels          pip download --platform manylinux_2_28_aarch64 --only-binary=:all: of the
#                    host's onnxruntime/numpy/tokenizers versions, then an offline
#                    `pip install --no-index` run by the arm64 python itself
# 4. model           a tiny random moe-mla-rope checkpoint exported on the host (torch + onnx)
# 5. runs            the same driver on x86 (host venv) and on arm64 (chroot + qemu-aarch64-static):
#                    greedy tokens must be identical; first-step logits are compared too.
#
# Correctness only: timings under qemu emulation say nothing about a real arm64 CPU.
# Everything big lives in $ARM64_WORK (default /var/tmp/perseus-arm64) and is reused by reruns.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${ARM64_WORK:-/var/tmp/perseus-arm64}
ROOT=$WORK/root
OUT_DIR=$REPO/studies/results/arm64
OUT=$OUT_DIR/smoke.txt
SUITE=${SUITE:-bookworm}  # python3.11, as the cp311 wheels
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PY=${PY:-$REPO/.venv/bin/python}
N_TOKENS=${N_TOKENS:-32}
PROMPT=${PROMPT:-"Once upon a time, a small robot named Pip lived in a lighthouse."}

log() { echo "[arm64-smoke $(date +%H:%M:%S)] $*" >&2; }
mkdir -p "$WORK" "$OUT_DIR"
t_start=$(date +%s)

# ---------------------------------------------------------------------------- 1. host tools
if ! command -v debootstrap >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
    log "installing debootstrap and qemu-user-static"
    apt-get install -y debootstrap qemu-user-static >/dev/null
fi
QEMU=$(command -v qemu-aarch64-static)

# ---------------------------------------------------------------------------- 2. arm64 root
if [ ! -x "$ROOT/usr/bin/python3" ]; then
    log "debootstrap --arch=arm64 --foreign $SUITE -> $ROOT"
    rm -rf "$ROOT"
    debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 "$SUITE" "$ROOT" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    cp "$QEMU" "$ROOT/usr/bin/"
    if [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
        log "second stage (binfmt_misc registered)"
        chroot "$ROOT" /debootstrap/debootstrap --second-stage >>"$WORK/debootstrap.log" 2>&1
    else
        log "no binfmt_misc for aarch64: unpacking the downloaded .debs with dpkg-deb"
        for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
    fi
fi
cp "$QEMU" "$ROOT/usr/bin/"
# onnxruntime resolves external-data files through /proc/self/fd: the root needs a /proc
mounted=""
cleanup() { if [ -n "$mounted" ]; then umount "$ROOT/proc" || true; fi; }
trap cleanup EXIT
if ! mountpoint -q "$ROOT/proc"; then mount -t proc proc "$ROOT/proc" && mounted=1; fi
# the host's env sets the guest's environment (an arm64 /usr/bin/env could not exec without
# binfmt); the host's pip settings (local indexes, find-links) are not the guest's
arm() { env -u PIP_FIND_LINKS -u PIP_CERT PIP_CONFIG_FILE=/dev/null chroot "$ROOT" /usr/bin/qemu-aarch64-static "$@"; }
arm /usr/bin/python3 -c "import platform, sys; assert platform.machine() == 'aarch64', platform.machine(); print(sys.version)" >/dev/null
log "arm64 python: $(arm /usr/bin/python3 -c 'import platform, sys; print(platform.machine(), sys.version.split()[0])')"

# ---------------------------------------------------------------------------- 3. wheels, offline install
pins=$("$PY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("onnxruntime", "numpy", "tokenizers", "psutil")))
EOF
)
WHEELS=$WORK/wheels
if [ ! -f "$WHEELS/.done-${pins// /_}" ]; then
    log "pip download (manylinux_2_28_aarch64, cp311): $pins"
    rm -rf "$WHEELS"; mkdir -p "$WHEELS"
    "$PY" -m pip download --quiet --dest "$WHEELS" --only-binary=:all: --python-version 3.11 \
        --implementation cp --abi cp311 --abi abi3 --abi none \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
        $pins pip
    touch "$WHEELS/.done-${pins// /_}"
fi
SITE=/opt/perseus/site
if [ ! -f "$ROOT$SITE/.done-${pins// /_}" ]; then
    log "offline pip install inside the arm64 root (slow under emulation)"
    rm -rf "$ROOT$SITE" "$ROOT/opt/perseus/wheels"; mkdir -p "$ROOT$SITE" "$ROOT/opt/perseus/wheels"
    cp "$WHEELS"/*.whl "$ROOT/opt/perseus/wheels/"
    pipwhl=$(cd "$ROOT/opt/perseus/wheels" && ls pip-*.whl)
    arm /usr/bin/python3 "/opt/perseus/wheels/$pipwhl/pip" install --quiet --no-index --no-cache-dir \
        --disable-pip-version-check --find-links /opt/perseus/wheels --target "$SITE" $pins
    touch "$ROOT$SITE/.done-${pins// /_}"
fi

# ---------------------------------------------------------------------------- 4. source + model
SRC=$ROOT/opt/perseus/src
rm -rf "$SRC"; mkdir -p "$SRC/perseus_edge/model" "$SRC/perseus_edge/runtime"
cp "$REPO"/perseus_edge/{__init__,errors,manifest,modelfile,tokenizer,data}.py "$SRC/perseus_edge/"
cp "$REPO"/perseus_edge/model/{__init__,config}.py "$SRC/perseus_edge/model/"
cp "$REPO"/runtime/*.py "$SRC/perseus_edge/runtime/"

MODEL=$WORK/model
log "exporting a tiny random checkpoint on the host"
"$PY" - "$WORK" <<'EOF'
import sys
from pathlib import Path

from perseus_edge.build import export_checkpoint
from perseus_edge.checkpoint import random_checkpoint
from perseus_edge.model.config import preset
from perseus_edge.tokenizer import DEFAULT_TOKENIZER

work = Path(sys.argv[1])
random_checkpoint(work / "ckpt", preset("tiny", vocab_size=8192), DEFAULT_TOKENIZER)
export_checkpoint(work / "ckpt", work / "model", force=True)
EOF
rm -rf "$ROOT/opt/perseus/model"; cp -r "$MODEL" "$ROOT/opt/perseus/model"

# ---------------------------------------------------------------------------- 5. the same driver on both
cat >"$ROOT/opt/perseus/smoke.py" <<'EOF'
"""Greedy generation + first-step logits; prints one JSON line. No torch anywhere."""
import json, platform, sys, time
model_dir, prompt, n, logits_out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
import numpy as np
import onnxruntime
import tokenizers
from perseus_edge.runtime.generate import Generator
t0 = time.perf_counter()
gen = Generator(model_dir, threads=1)
res = gen.generate(prompt, n, temperature=0.0, ignore_eos=True)
gen.model.cache.reset()
ids = np.array([res.prompt_tokens])
np.save(logits_out, gen.model.forward(ids, 0)[0, -1].astype(np.float32))
print(json.dumps({
    "machine": platform.machine(), "python": sys.version.split()[0],
    "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "tokenizers": tokenizers.__version__,
    "torch_imported": "torch" in sys.modules, "prompt_tokens": res.prompt_tokens, "tokens": res.tokens,
    "text": res.text, "decode_tok_s": round(res.timings.decode_tok_s, 1), "wall_s": round(time.perf_counter() - t0, 2),
}))
EOF
log "x86 run"
x86_json=$(cd "$REPO" && "$PY" "$ROOT/opt/perseus/smoke.py" "$MODEL" "$PROMPT" "$N_TOKENS" "$WORK/logits_x86.npy")
log "arm64 run (qemu)"
arm_json=$(PYTHONPATH=/opt/perseus/src:$SITE OPENBLAS_NUM_THREADS=1 arm /usr/bin/python3 \
    /opt/perseus/smoke.py /opt/perseus/model "$PROMPT" "$N_TOKENS" /opt/perseus/logits_arm64.npy)
cp "$ROOT/opt/perseus/logits_arm64.npy" "$WORK/logits_arm64.npy"

# ---------------------------------------------------------------------------- compare, report
"$PY" - "$x86_json" "$arm_json" "$WORK" "$OUT" "$(( $(date +%s) - t_start ))" "$($QEMU --version | head -1)" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
x86, arm, work, out, secs, qemu = json.loads(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5], sys.argv[6]
lx, la = np.load(work / "logits_x86.npy"), np.load(work / "logits_arm64.npy")
diff = float(np.abs(lx - la).max())
same = x86["tokens"] == arm["tokens"] and x86["prompt_tokens"] == arm["prompt_tokens"]
first_diff = next((i for i, (a, b) in enumerate(zip(x86["tokens"], arm["tokens"])) if a != b), None)
lines = [
    "perseus-edge arm64 smoke test (studies/arm64_smoke.sh): greedy generation, x86 host vs arm64 under qemu-user",
    f"model: tiny random moe-mla-rope checkpoint (vocab 8192), fp32 portable export; {len(x86['tokens'])} new tokens, threads 1",
    f"emulator: {qemu}; arm64 root: Debian bookworm (debootstrap --foreign, python3 from .debs)",
    "",
]
for name, r in (("x86_64 ", x86), ("aarch64", arm)):
    lines.append(f"{name}: machine={r['machine']} python={r['python']} onnxruntime={r['onnxruntime']} "
                 f"numpy={r['numpy']} tokenizers={r['tokenizers']} torch_imported={r['torch_imported']} "
                 f"decode={r['decode_tok_s']} tok/s wall={r['wall_s']} s")
lines += ["", f"prompt tokens ({len(x86['prompt_tokens'])}): {x86['prompt_tokens']}",
          f"x86 tokens:   {x86['tokens']}", f"arm64 tokens: {arm['tokens']}",
          f"x86 text:   {x86['text']!r}", f"arm64 text: {arm['text']!r}",
          f"first-step logits max |x86 - arm64|: {diff:.3e}", "",
          ("RESULT: MATCH (greedy tokens identical)" if same else
           f"RESULT: MISMATCH (first differing new token at index {first_diff})"),
          "(timings under emulation are not arm64 performance)", f"script wall time: {secs} s"]
out.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if same else 1)
EOF
