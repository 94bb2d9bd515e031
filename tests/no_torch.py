"""Run code in a fresh interpreter where `import torch` fails: the runtime, the quantizer and the
bench must never need it (the wheel's base install has no torch)."""

from __future__ import annotations

import subprocess
import sys

BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked for this test")
        return None
sys.meta_path.insert(0, _NoTorch())
"""

CLI = """
import perseus_edge.cli
sys.argv = ["perseus"] + sys.argv[1:]
perseus_edge.cli.main()
"""


def run_without_torch(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -c CODE ARGS...` with torch blocked; CODE is top-level (dedented) Python."""
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code, *args], capture_output=True, text=True,
                          timeout=timeout)
