"""NAME=FOLDER arguments of the perf scripts: FOLDER@body loads the folder with the native perseus
kernels off (PERSEUS_KERNELS=0 while the session is made), so one process times both."""

from __future__ import annotations

import os

BODY = "@body"


def folder_of(path: str) -> str:
    return path.removesuffix(BODY)


def load(path: str, threads: int, **kwargs):
    """A runtime Model for FOLDER or FOLDER@body (verify=False; kwargs go to Model)."""
    from perseus_edge.runtime.model import Model

    saved = os.environ.get("PERSEUS_KERNELS")
    if path.endswith(BODY):
        os.environ["PERSEUS_KERNELS"] = "0"
    try:
        return Model(folder_of(path), threads=threads, verify=False, **kwargs)
    finally:
        if saved is None:
            os.environ.pop("PERSEUS_KERNELS", None)
        else:
            os.environ["PERSEUS_KERNELS"] = saved
