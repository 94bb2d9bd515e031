"""Where the time and memory went, printed at the end of a run the way llama.cpp does.

    load time           model folder verified + ORT session created
    prompt eval         prefill: prompt tokens through the graph (tokens per second)
    eval                decode: one graph run per generated token after the first
    sampling            the numpy sampler, all tokens
    time to first token from the call to generate() to the first sampled token
    peak RSS            the process's resident-set high-water mark (getrusage), MiB, and the
                        anonymous part of the RSS at the end (weights mapped from disk excluded)
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass


def now() -> float:
    return time.perf_counter()


def proc_status_bytes(*fields: str) -> dict[str, int]:
    """Memory fields of /proc/self/status (VmHWM, VmRSS, RssAnon, ...) in bytes; {} off Linux."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in fields:
                    out[name] = int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return out


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (0 where unknown).

    Linux: VmHWM. getrusage's ru_maxrss would carry over the parent's peak into a child started
    with fork/exec, so a small run launched from a big process would misreport.
    """
    peak = proc_status_bytes("VmHWM").get("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB
    except (ImportError, OSError):
        pass
    try:
        import psutil

        info = psutil.Process(os.getpid()).memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    except Exception:  # noqa: BLE001 - a missing number must never break a run
        return 0


def anon_rss_bytes() -> int:
    """Anonymous (non-file-backed) resident memory now: what the OS cannot just drop and re-read.

    Weights memory-mapped from model.onnx.data count in the RSS as clean file pages; this is the
    rest. Linux only (0 elsewhere)."""
    return proc_status_bytes("RssAnon").get("RssAnon", 0)


@dataclass
class Timings:
    load_s: float = 0.0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    decode_tokens: int = 0  # graph runs after the prefill
    decode_s: float = 0.0
    sample_s: float = 0.0  # sampler (numpy) time, all tokens
    ttft_s: float = 0.0
    total_s: float = 0.0
    peak_rss: int = 0
    anon_rss: int = 0  # anonymous resident memory at the end (Linux)
    threads: int = 0

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "prompt_tok_s": self.prompt_tok_s, "decode_tok_s": self.decode_tok_s}

    def report(self) -> str:
        def line(label: str, seconds: float, n: int, unit: str) -> str:
            ms = seconds * 1e3
            per = ms / n if n else 0.0
            rate = n / seconds if seconds > 0 else 0.0
            return (f"{label:<20}= {ms:10.2f} ms / {n:5d} {unit:<6} "
                    f"({per:8.2f} ms per token, {rate:9.2f} tokens per second)")

        rows = [
            f"{'load time':<20}= {self.load_s * 1e3:10.2f} ms",
            line("prompt eval time", self.prompt_s, self.prompt_tokens, "tokens"),
            line("eval time", self.decode_s, self.decode_tokens, "runs"),
            f"{'sampling time':<20}= {self.sample_s * 1e3:10.2f} ms",
            f"{'time to first token':<20}= {self.ttft_s * 1e3:10.2f} ms",
            f"{'total time':<20}= {self.total_s * 1e3:10.2f} ms",
            f"{'peak RSS':<20}= {self.peak_rss / 2**20:10.1f} MiB"
            + (f"   (anonymous now {self.anon_rss / 2**20:.1f} MiB)" if self.anon_rss else "")
            + (f"   threads {self.threads}" if self.threads else ""),
        ]
        return "\n".join(rows)
