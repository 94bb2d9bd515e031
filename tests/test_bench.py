"""perseus bench / perseus profile on the tiny model: well-formed outputs, no numbers asserted."""

from __future__ import annotations

import json

import pytest

from perseus_edge.bench import graphinfo
from perseus_edge.bench.report import RECORD_KEYS


@pytest.fixture(scope="module")
def bench_result(make_checkpoint, tmp_path_factory):
    from perseus_edge.bench.harness import BenchConfig, run_bench

    root = tmp_path_factory.mktemp("bench")
    moe, mha = str(make_checkpoint()), str(make_checkpoint("mha"))
    cfg = BenchConfig(out_dir=str(root / "out"), work_dir=str(root / "work"), models={"tiny": moe},
                      archs={"moe-mla-rope": moe, "mha": mha}, threads=[1], arch_threads=[1], pp=[16], tg=4,
                      contexts=[8, 300], arch_contexts=[8], arch_pp=[], reps=2, profile_contexts=[8], schemes=["int8"],
                      quick=True, command="pytest")
    result = run_bench(cfg, log=lambda s: None)
    return result, root / "out"


def test_bench_writes_well_formed_results(bench_result):
    result, out = bench_result
    data = json.loads((out / "bench.json").read_text())
    assert data["records"], "no records"
    backends = {r["backend"] for r in data["records"]}
    assert {"torch-eager", "onnx-portable", "onnx-ort-cpu"} <= backends
    for r in data["records"]:
        missing = [k for k in RECORD_KEYS if k not in r]
        assert not missing, missing
        assert r["tok_s_min"] <= r["tok_s_median"] <= r["tok_s_max"]
        assert r["reps"] == 2 and r["peak_rss_bytes"] > 0
    tests = {(r["test"], r["n_tokens"], r["context"]) for r in data["records"] if r["group"] == "main"}
    # the context 300 is clipped to what the tiny model's cache (256) holds
    assert tests == {("pp", 16, 0), ("tg", 4, 8), ("tg", 4, 256 - 4 - 1)}
    assert {r["arch"] for r in data["records"] if r["group"] == "arch"} == {"moe-mla-rope", "mha"}
    for key in ("peaks", "roofline", "footprint", "op_profile", "parity"):
        assert data.get(key), key

    readme = (out / "README.md").read_text()
    assert "| model | size | params | backend | variant | threads | test | t/s" in readme
    assert "## Seed claims and goals: held / not held" in readme
    assert "tg4 @8" in readme and "pp16" in readme
    for name in ("tok_s_vs_context.png", "memory_vs_context.png", "footprint.png", "arch_decode.png"):
        assert (out / name).stat().st_size > 1000, name


def test_parity_of_tiny_export(bench_result):
    result, _ = bench_result
    folders = result["parity"][0]["folders"]
    assert {"portable fp32", "ort-cpu fp32"} <= set(folders)
    for label, folder in folders.items():
        assert 0 <= folder["greedy_agreement"] <= 1 and folder["steps"] > 0
        if label.endswith("fp32"):  # quantized folders differ by design: reported, not asserted
            assert folder["decode_max_abs_diff"] < 1e-3 and folder["greedy_agreement"] == 1.0


def test_profile_components_sum_to_total(bench_result, tmp_path):
    from perseus_edge.bench.footprint import footprint, markdown_table

    result, _ = bench_result
    folder = result["subjects"][0]["folders"]["ort-cpu fp32"]
    fp = footprint(folder, measure=False)
    total = sum(t.nbytes for t in graphinfo.initializers(folder))
    assert set(fp["weights"]) == set(graphinfo.COMPONENTS)
    assert sum(fp["weights"].values()) == fp["weights_total"] == total
    assert fp["weights"]["experts"] > 0 and fp["weights"]["attention"] > 0 and fp["weights"]["other"] == 0
    # MLA cache: (kv_lora_rank + rope) per layer vs MHA's 2 x hidden per layer
    cfg = graphinfo.read_config(folder)
    assert fp["cache"]["bytes_per_token"] == cfg.kv_bytes_per_token()
    assert fp["mha_kv_bytes_per_token"] == cfg.replace(arch="mha").kv_bytes_per_token()
    # measured footprints from the benchmark: the same component sums
    for m in result["footprint"]:
        assert sum(m["weights"].values()) == m["weights_total"]
        assert m["measured"]["final"] > 0
    assert "weights total" in markdown_table(result["footprint"])


def test_profile_cli(bench_result, tmp_path):
    import typer
    from typer.testing import CliRunner

    from perseus_edge.cli.bench import register

    app = typer.Typer()  # only the bench commands, the global CLI app untouched
    register(app)
    result, _ = bench_result
    folders = result["subjects"][0]["folders"]
    res = CliRunner().invoke(app, ["profile", folders["portable fp32"], folders["ort-cpu fp32"],
                                   "--out", str(tmp_path), "--steps", "4", "--prefill", "16"])
    assert res.exit_code == 0, res.output
    assert "perseus.LatentAttention (body)" in res.output
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert len(prof["footprint"]) == 2 and len(prof["op_profile"]) == 2
    assert (tmp_path / "footprint.png").is_file()
    assert not list(tmp_path.glob("*.json"))[1:]  # the ORT trace was not kept
    bad = CliRunner().invoke(app, ["profile", str(tmp_path)])
    assert bad.exit_code != 0


def test_roofline_helpers_are_sane(bench_result):
    from perseus_edge.bench.roofline import copy_gbs, gemm_gflops, roofline

    gflops = gemm_gflops(1, n=256, runs=2)
    gbs = copy_gbs(1, mib=32, runs=2)
    assert 0.1 < gflops < 1e5 and 0.1 < gbs < 1e4
    peak = {"gflops": 100.0, "gops_int8": 400.0, "gbs": 10.0}
    mem = roofline(bytes=1e8, flops=1e8, peak=peak)
    assert mem["bound"] == "memory" and mem["tok_s"] == pytest.approx(100.0)
    comp = roofline(bytes=1e3, flops=1e10, peak=peak)
    assert comp["bound"] == "compute" and comp["tok_s"] == pytest.approx(10.0)
    assert roofline(bytes=1e3, flops=1e10, peak=peak, integer=True)["tok_s"] == pytest.approx(40.0)
    # the portable MoE graph reads every expert, the lowered one only top-k of them
    result, _ = bench_result
    folders = result["subjects"][0]["folders"]
    portable = graphinfo.decode_cost(folders["portable fp32"], 8)
    lowered = graphinfo.decode_cost(folders["ort-cpu fp32"], 8)
    assert lowered["weight_bytes"] < portable["weight_bytes"] and lowered["sparse_moe"]
    assert lowered["flops"] < portable["flops"]
    assert graphinfo.decode_cost(folders["ort-cpu fp32"], 200)["bytes"] > lowered["bytes"]
    for row in result["roofline"]:
        assert row["bound_tok_s"] > 0 and row["fraction"] > 0
