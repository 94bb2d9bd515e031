"""Load test for `perseus serve` on loopback: throughput at 1, 4 and 16 clients, and an overload run.

    python studies/serve/loadtest.py MODEL_DIR --out studies/serve/results.json

Everything is bounded: a fixed number of requests per measurement, a wall-clock limit per run,
loopback only. The servers are real `perseus serve` processes on free ports.

throughput  One server with 16 slots; the same list of requests (short prompts, greedy,
            `max_tokens` tokens each with ignore_eos, so every request decodes exactly as many
            tokens) is sent by 1, 4 and 16 concurrent clients, and by 16 clients to a server with
            1 slot (requests queue and are served one at a time). Configurations alternate within
            each round (interleaved rounds); the median round is reported. Decode throughput is
            completion tokens / wall time of the whole batch of requests.
overload    A server with 4 slots and a queue of 8 gets `--burst` requests from 24 concurrent
            clients (each sends its next request when one ends, after a pause if it was refused
            with 429): well-formed ones, malformed ones and clients that hang up after the first
            streamed event.
            Every request must end in exactly one of: answered in full (all `max_tokens` tokens,
            finish_reason "length"), refused with an OpenAI-style JSON error (429 queue_full /
            400), or disconnected by the client on purpose. "lost" (anything else: a timeout, a
            dropped connection, a short or malformed answer) must be 0, and the server must end
            healthy with no running or waiting request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    import httpx
except ImportError:  # openai >= 3 ships the same client as httpx2
    import httpx2 as httpx

PROMPTS = ["Once upon a time", "The old captain looked at the sea and said", "It was a dark night and",
           "Chapter I. The House on the Hill", "She opened the door and saw", "In the morning the",
           "He had never seen such a", "A long way from home, the children", "The letter arrived on",
           "My dear friend, I write to you", "When the ship came into the harbour", "There was once a king",
           "The village lay at the foot of", "Nobody knew where the stranger", "It is a truth universally",
           "The rain had not stopped for"]


class ServerProcess:
    """`perseus serve MODEL --port 0 ...` in a subprocess; the URL is read from its first line."""

    def __init__(self, model: str, *args: str):
        cmd = [sys.executable, "-m", "perseus_edge.cli", "serve", model, "--port", "0",
               "--model-name", "m", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        if not m:
            self.proc.kill()
            raise SystemExit(f"server did not start: {line}{self.proc.stderr.read()}")
        self.url = m.group(1)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def body(i: int, max_tokens: int, stream: bool = False) -> dict:
    return {"model": "m", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}


async def run_clients(url: str, n_requests: int, clients: int, max_tokens: int, limit_s: float) -> dict:
    """n_requests requests by `clients` concurrent workers; per-request latency and totals."""
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    latencies, tokens, errors = [], 0, []

    async def worker(client):
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            t0 = time.perf_counter()
            r = await client.post(url + "/v1/completions", json=body(i, max_tokens))
            if r.status_code != 200:
                errors.append(r.text)
                continue
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=limit_s, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(clients))), limit_s)
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"clients": clients, "requests": n_requests, "answered": len(lat), "errors": errors[:3],
            "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "latency_s": {"mean": statistics.fmean(lat), "p50": lat[len(lat) // 2],
                          "p90": lat[min(len(lat) - 1, int(0.9 * len(lat)))], "max": lat[-1]}}


def throughput(args) -> dict:
    batched = ServerProcess(args.model, "--slots", "16", "-t", str(args.threads), "--max-queue", "64")
    serial = ServerProcess(args.model, "--slots", "1", "-t", str(args.threads), "--max-queue", "64")
    configs = [("1 client", batched, 1), ("4 clients", batched, 4), ("16 clients", batched, 16),
               ("16 clients, 1 slot (one at a time)", serial, 16)]
    rounds: dict[str, list] = {name: [] for name, _, _ in configs}
    try:
        asyncio.run(run_clients(batched.url, 4, 4, 8, args.limit_s))  # warm-up (sessions, arenas)
        asyncio.run(run_clients(serial.url, 2, 1, 8, args.limit_s))
        for r in range(args.rounds):
            for name, server, clients in configs:
                res = asyncio.run(run_clients(server.url, args.requests, clients, args.max_tokens, args.limit_s))
                res["load_avg_1min_after"] = os.getloadavg()[0]  # the machine is shared: say how busy
                print(f"round {r} {name:38s} {res['tokens_per_s']:7.1f} tok/s  latency p50 "
                      f"{res['latency_s']['p50']:.2f} s  answered {res['answered']}/{res['requests']}",
                      flush=True)
                rounds[name].append(res)
        health = {"batched": batched.health(), "serial": serial.health()}
    finally:
        batched.stop()
        serial.stop()
    # medians over rounds; the speedup is taken within each round (same machine load), then the median
    base = [r["tokens_per_s"] for r in rounds["1 client"]]
    summary = {}
    for name, runs in rounds.items():
        ratios = sorted(r["tokens_per_s"] / b for r, b in zip(runs, base))
        summary[name] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                         "latency_p50_s": statistics.median(r["latency_s"]["p50"] for r in runs),
                         "latency_p90_s": statistics.median(r["latency_s"]["p90"] for r in runs),
                         "vs_1_client": statistics.median(ratios), "vs_1_client_min": ratios[0],
                         "vs_1_client_max": ratios[-1]}
    return {"summary": summary, "rounds": rounds, "health_after": health}


async def overload(url: str, args) -> dict:
    """A burst: well-formed, malformed and disconnecting requests all at once."""
    outcomes: dict[str, int] = {"answered": 0, "refused_429": 0, "refused_400": 0, "disconnected": 0,
                                "lost": 0}
    lost: list[str] = []
    n = args.burst

    async def good(client, i):
        try:
            r = await client.post(url + "/v1/completions", json=body(i, args.max_tokens))
        except Exception as e:  # noqa: BLE001 - a lost request, reported
            lost.append(f"{i}: {type(e).__name__}: {e}")
            return
        if r.status_code == 200:
            d = r.json()
            ok = (d["usage"]["completion_tokens"] == args.max_tokens
                  and d["choices"][0]["finish_reason"] == "length" and d["choices"][0]["text"])
            outcomes["answered" if ok else "lost"] += 1
            if not ok:
                lost.append(f"{i}: short answer {d}")
        elif r.status_code == 429 and r.json()["error"]["code"] == "queue_full":
            outcomes["refused_429"] += 1
            return "refused"
        else:
            lost.append(f"{i}: {r.status_code} {r.text[:200]}")
            outcomes["lost"] += 1

    async def malformed(client, i):
        bad = [b"{oops", json.dumps({**body(i, 4), "temperature": "hot"}).encode(),
               json.dumps({**body(i, 4), "unknown": 1}).encode(), b"x" * (2 << 20)][i % 4]
        try:
            r = await client.post(url + "/v1/completions", content=bad,
                                  headers={"content-type": "application/json"})
            if r.status_code in (400, 413) and "error" in r.json():
                outcomes["refused_400"] += 1
                return
            lost.append(f"malformed {i}: {r.status_code} {r.text[:200]}")
        except Exception as e:  # noqa: BLE001
            lost.append(f"malformed {i}: {type(e).__name__}: {e}")
        outcomes["lost"] += 1

    async def disconnect(client, i):
        try:
            async with client.stream("POST", url + "/v1/completions", json=body(i, args.max_tokens, True)) as r:
                if r.status_code == 429:
                    outcomes["refused_429"] += 1
                    return "refused"
                async for _ in r.aiter_lines():
                    break  # the first event, then hang up
            outcomes["disconnected"] += 1
        except Exception as e:  # noqa: BLE001
            lost.append(f"disconnect {i}: {type(e).__name__}: {e}")
            outcomes["lost"] += 1

    kinds = [good] * 8 + [malformed, disconnect]
    todo: asyncio.Queue = asyncio.Queue()
    for i in range(n):
        todo.put_nowait(i)

    async def client_loop(client):  # each client sends its next request when one ends
        while not todo.empty():
            i = todo.get_nowait()
            if await kinds[i % len(kinds)](client, i) == "refused":
                await asyncio.sleep(args.backoff_s)  # as a polite client does after a 429

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=args.overload_clients + 8)
    async with httpx.AsyncClient(timeout=args.limit_s, limits=limits) as client:
        await asyncio.wait_for(asyncio.gather(*(client_loop(client) for _ in range(args.overload_clients))),
                               args.limit_s)
    return {"requests": n, "clients": args.overload_clients, "wall_s": time.perf_counter() - t0,
            "outcomes": outcomes, "lost_detail": lost[:10]}


def run_overload(args) -> dict:
    server = ServerProcess(args.model, "--slots", "4", "--max-queue", "8", "-t", str(args.threads),
                           "--max-body-bytes", str(1 << 20))
    try:
        res = asyncio.run(overload(server.url, args))
        deadline = time.monotonic() + 30
        while (h := server.health())["running"] or h["waiting"]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        res["health_after"] = h
    finally:
        server.stop()
    o = res["outcomes"]
    res["accounted"] = sum(o.values()) == res["requests"]
    print(f"overload: {o} in {res['wall_s']:.1f} s; accounted for every request: {res['accounted']}; "
          f"server after: running {h['running']} waiting {h['waiting']} status {h['status']}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=32, help="requests per measurement")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--burst", type=int, default=200, help="requests in the overload run")
    ap.add_argument("--overload-clients", type=int, default=24,
                    help="concurrent clients in the overload run (the server has 4 slots + 8 waiting)")
    ap.add_argument("--backoff-s", type=float, default=1.0, help="an overload client's pause after a 429")
    ap.add_argument("--limit-s", type=float, default=300, help="wall-clock limit per run")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    res = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "commit": commit,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "load_avg_at_start": os.getloadavg()},
           "model": args.model, "max_tokens": args.max_tokens, "requests": args.requests}
    res["overload"] = run_overload(args)
    if not args.skip_throughput:
        res["throughput"] = throughput(args)
        for name, s in res["throughput"]["summary"].items():
            print(f"{name:38s} {s['tokens_per_s']:7.1f} tok/s  x{s['vs_1_client']:.2f} "
                  f"(x{s['vs_1_client_min']:.2f}..x{s['vs_1_client_max']:.2f})  latency p50 "
                  f"{s['latency_p50_s']:.2f} s  p90 {s['latency_p90_s']:.2f} s")
    res["machine"]["load_avg_at_end"] = os.getloadavg()
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(args.out)
    ok = res["overload"]["outcomes"]["lost"] == 0 and res["overload"]["accounted"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
