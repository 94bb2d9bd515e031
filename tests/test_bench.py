"""perseus bench / perseus profile on a tiny exported model: well-formed outputs; profile sizes and sums
checked against onnx and the config (timings themselves are not asserted)."""

from __future__ import annotations

import csv
import io
import json
import subprocess

import pytest
import typer
from typer.testing import CliRunner

from perseus_edge.bench import graphinfo
from perseus_edge.bench.rounds import make_tests, run_rounds, schedule
from perseus_edge.runtime.kernels import library as native_library
from no_torch import CLI, run_without_torch  # tests/no_torch.py


@pytest.fixture(scope="module")
def folders(make_checkpoint, tmp_path_factory):
    from perseus_edge.build import export_checkpoint

    root = tmp_path_factory.mktemp("bench")
    ckpt = make_checkpoint()
    return {t: export_checkpoint(ckpt, root / t, target=t) for t in ("portable", "ort-cpu")}


def perseus(*args: str) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process where torch cannot be imported."""
    return run_without_torch(CLI, *args)


def bench_app() -> typer.Typer:
    from perseus_edge.cli.bench import register

    app = typer.Typer()  # only the bench commands, the global CLI app untouched
    register(app)
    return app


def test_bench_json_torch_free(folders):
    p = perseus("bench", "-m", str(folders["ort-cpu"]), "-m", str(folders["portable"]), "-p", "16",
                "-n", "4", "-d", "0,8", "-t", "1", "-r", "2", "-o", "json")
    assert p.returncode == 0, p.stderr
    records = json.loads(p.stdout)
    tests = ["pp16", "pp16 @ d8", "tg4", "tg4 @ d8"]
    assert [(r["model"], r["test"]) for r in records] == [(m, t) for m in ("ort-cpu", "portable") for t in tests]
    for r in records:
        assert r["backend"] == "onnxruntime" and r["threads"] == 1 and len(r["samples_ts"]) == 2
        assert min(r["samples_ts"]) <= r["avg_ts"] <= max(r["samples_ts"]) and r["stddev_ts"] >= 0
        assert r["peak_rss_bytes"] > 2**20 and r["size_bytes"] > 0 and r["params"] > 0
        assert (r["n_prompt"], r["n_gen"]) == ((16, 0) if r["test"].startswith("pp") else (0, 4))
        assert r["n_depth"] == (8 if "@" in r["test"] else 0)


def test_bench_md_and_csv(folders):
    args = ["bench", "-m", str(folders["ort-cpu"]), "-p", "8", "-n", "2", "-t", "1", "-r", "1"]
    res = CliRunner().invoke(bench_app(), args)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("|")]
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "model", "size", "params", "backend", "threads", "test", "t/s", "peak RSS"]
    assert len(lines) == 4 and "| pp8 " in lines[2] and "| tg2 " in lines[3] and "MiB" in lines[2]
    res = CliRunner().invoke(bench_app(), args + ["-o", "csv"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["test"] for r in rows] == ["pp8", "tg2"]
    assert all(float(r["avg_ts"]) > 0 and len(r["samples_ts"].split(";")) == 1 for r in rows)


def test_rounds_interleave_every_cell():
    tests = make_tests([64, 256], [128], [0, 900])
    assert [t.name for t in tests] == ["pp64", "pp64 @ d900", "pp256", "pp256 @ d900", "tg128", "tg128 @ d900"]
    calls = []
    samples = run_rounds(3, tests, 2, lambda w, t: calls.append((w, t)) or float(len(calls)))
    # round 0 is a warm-up; in each round every worker runs a test before any worker runs the next
    per_round = 3 * len(tests)
    assert calls == [(w, t) for _ in range(3) for t in tests for w in range(3)]
    assert len(calls) == schedule(3, tests, 2).__len__() == 3 * per_round
    assert samples[(1, tests[0])] == [per_round + 2.0, 2 * per_round + 2.0]
    assert set(samples) == {(w, t) for w in range(3) for t in tests}


@pytest.mark.parametrize("args, message", [
    (["-m", "/nonexistent/model"], "error: model not found: /nonexistent/model"),
    (["-p", "64,x"], "error: -p takes a comma-separated list of integers, got '64,x'"),
    (["-t", "0"], "error: -t takes integers >= 1, got '0'"),
    (["-d", "-1"], "error: -d takes integers >= 0, got '-1'"),
    (["-o", "xml"], "error: -o takes one of md, json, csv, got 'xml'"),
    (["-p", "0", "-n", "0"], "error: nothing to run: every -p and -n is 0"),
    (["-p", "0", "-n", "8", "-d", "250"], "positions; the tests need 258 (depth + tokens)"),
])
def test_bench_errors(folders, tmp_path, args, message):
    full = ["bench", "-m", str(folders["ort-cpu"]), "-r", "1"] + args + ([] if "-t" in args else ["-t", "1"])
    res = CliRunner().invoke(bench_app(), full)
    assert res.exit_code != 0
    text = str(res.exception) if not isinstance(res.exception, SystemExit) else res.output
    assert message.removeprefix("error: ") in text, text


def test_bench_refuses_what_is_not_a_model(folders, tmp_path):
    from perseus_edge.bench.llama import available
    from perseus_edge.bench.rounds import resolve_model
    from perseus_edge.errors import PerseusError

    with pytest.raises(PerseusError, match="is neither a model folder nor a .gguf file"):
        resolve_model(str(folders["ort-cpu"] / "model.onnx"))
    with pytest.raises(PerseusError, match=r"is not a model folder \(no model.onnx or model.ort\)"):
        resolve_model(str(tmp_path))
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    if available():
        assert resolve_model(str(tmp_path / "x.gguf")).backend == "llama.cpp"
    else:
        with pytest.raises(PerseusError, match=r"needs llama-cpp-python: pip install 'perseus-edge\[llama\]'"):
            resolve_model(str(tmp_path / "x.gguf"))


def onnx_weight_bytes(folder) -> dict[str, int]:
    """Initializer name -> bytes, read with onnx itself (independent of graphinfo)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    return {t.name: numpy_helper.to_array(t).nbytes for t in model.graph.initializer}


def test_profile_cli(folders, tmp_path):
    res = CliRunner().invoke(bench_app(), ["profile", str(folders["portable"]), str(folders["ort-cpu"]),
                                           "--out", str(tmp_path), "--steps", "4", "--prefill", "16"])
    assert res.exit_code == 0, res.output
    # the op runs as the native kernel where the library is built, else as its function's body
    scope = "perseus.LatentAttention (native)" if native_library() else "perseus.LatentAttention (body)"
    assert scope in res.output and "weights total" in res.output
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert [p["label"] for p in prof["op_profile"]] == ["portable", "ort-cpu"]
    for fp, target in zip(prof["footprint"], ("portable", "ort-cpu")):
        assert fp["weights_total"] == sum(onnx_weight_bytes(folders[target]).values())
    for op in prof["op_profile"]:
        assert op["steps"] == op["decode_runs"] == 4  # the prefill run is not counted
        kernels = sum(r["total_us"] for r in op["by_op"])
        assert sum(r["total_us"] for r in op["by_scope"]) == pytest.approx(kernels)
        assert op["kernels_us_per_step"] == pytest.approx(kernels / 4)
        assert op["framework_share"] == pytest.approx(max(0.0, 1 - kernels / 4 / op["step_us_median"]))
        for r in op["by_op"]:  # every decode step runs each kernel once
            assert r["per_step_us"] == pytest.approx(r["total_us"] / 4)
            assert r["share"] == pytest.approx(r["per_step_us"] / op["step_us_median"])
            assert r["nodes_per_step"] == int(r["nodes_per_step"]) >= 1
        attention = "LatentAttention" if native_library() else "Softmax"  # the native op, or its body's
        assert {"MatMul", attention} <= {r["name"] for r in op["by_op"]}
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]  # the ORT trace was not kept
    bad = CliRunner().invoke(bench_app(), ["profile", str(tmp_path)])
    assert bad.exit_code != 0


def test_op_profile_summary_of_a_known_trace():
    """A hand-made trace: the prefill run, kernels between runs and non-kernel events are dropped."""
    from perseus_edge.bench.opprofile import summarise

    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def kernel(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [run(0, 100), kernel("prefill", "MatMul", 10, 40),
              run(200, 50), kernel("o_proj_mm", "MatMul", 210, 10), kernel("_inlfunc_LatentAttention_3", "Add", 225, 5),
              {"cat": "Node", "name": "o_proj_mm_fence_before", "ts": 211, "dur": 99},
              kernel("between", "MatMul", 260, 7),
              run(300, 70), kernel("n1", "MatMul", 310, 20)]
    got = summarise(events, {"o_proj_mm": "attention matmuls"})
    assert (got["decode_runs"], got["step_us_median"], got["kernels_us_per_step"]) == (2, 60, 17.5)
    assert got["framework_share"] == pytest.approx(1 - 17.5 / 60)
    assert got["by_op"] == [
        {"name": "MatMul", "total_us": 30, "per_step_us": 15, "share": 0.25, "nodes_per_step": 1.0},
        {"name": "Add", "total_us": 5, "per_step_us": 2.5, "share": 2.5 / 60, "nodes_per_step": 0.5}]
    assert [(r["name"], r["total_us"]) for r in got["by_scope"]] == [
        ("other (norms, adds, glue)", 20), ("attention matmuls", 10), ("perseus.LatentAttention (body)", 5)]


def test_footprint_components_match_the_config(folders):
    """Bytes per component against onnx's own initializer sizes and the config's parameter counts."""
    from perseus_edge.bench.footprint import footprint

    cfg = graphinfo.read_config(folders["ort-cpu"])
    H, V, L, E, F = (cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.n_routed_experts,
                     cfg.moe_intermediate_size)
    for target in ("portable", "ort-cpu"):
        folder = folders[target]
        fp = footprint(folder, measure=False)
        sizes = onnx_weight_bytes(folder)
        assert set(fp["weights"]) == set(graphinfo.COMPONENTS)
        assert sum(fp["weights"].values()) == fp["weights_total"] == sum(sizes.values())
        w = fp["weights"]  # fp32: 4 bytes per parameter; gate, up and down of each expert
        assert (w["embeddings"], w["head"]) == (4 * V * H, 4 * V * H)
        assert w["experts"] == 4 * L * E * 3 * H * F
        assert w["shared experts"] == 4 * L * cfg.n_shared_experts * 3 * H * F
        assert w["router"] == 4 * L * (H * E + E)
        assert w["rope tables"] == sizes["rope.cos"] + sizes["rope.sin"] > 0
        assert w["norms"] == 4 * (L * (2 * H + cfg.kv_lora_rank) + H)
        assert w["other"] == w["mlp"] == 0
    cfg = graphinfo.read_config(folders["ort-cpu"])  # MLA cache: (kv_lora_rank + rope) per layer vs MHA's 2 x hidden
    assert fp["cache"]["bytes_per_token"] == cfg.kv_bytes_per_token()
    assert fp["mha_kv_bytes_per_token"] == cfg.replace(arch="mha").kv_bytes_per_token()
    # the portable MoE graph reads every expert per token, the lowered one only top-k of them
    portable = graphinfo.decode_cost(folders["portable"], 8)
    lowered = graphinfo.decode_cost(folders["ort-cpu"], 8)
    assert lowered["weight_bytes"] < portable["weight_bytes"] and lowered["sparse_moe"]


def test_research_harness_imports():
    """studies/cpu stays importable from the checkout (its full run is not a CI test)."""
    from studies.cpu import harness, report, roofline

    assert harness.DEFAULT_CHECKPOINT.is_dir() and callable(report.write_report)
    peak = {"gflops": 100.0, "gops_int8": 400.0, "gbs": 10.0}
    assert roofline.roofline(bytes=1e8, flops=1e8, peak=peak)["tok_s"] == pytest.approx(100.0)
    assert roofline.roofline(bytes=1e3, flops=1e10, peak=peak)["bound"] == "compute"
