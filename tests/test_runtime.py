"""The torch-free runtime: sampler, streaming detokenisation, generation, cache, CLI, .ort, eval.

Two kinds of model folder:
  - `toy`: a hand-built ONNX graph with the perseus contract (TensorScatter cache, causal mixing)
    and a numpy reference; exercises the runtime's mechanics without the exporter.
  - `exported`: the fp32 export of a tiny random checkpoint (needs perseus_edge.export), checked
    token for token and logit for logit against the PyTorch model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from perseus_edge.errors import PerseusError
from perseus_edge.sampling import Sampler
from perseus_edge.runtime.stream import StopFilter, TextStream, token_bytes_table
from no_torch import run_without_torch  # tests/no_torch.py

TOY_CONTEXT = 64
UNICODE_TEXT = ("Once upon a time — naïve café crème, 東京タワー, 你好世界, 🤖🌊👩‍👩‍👧 and ½ × ∞. "
                "Ünïcödé: Ελληνικά, русский, العربية, हिन्दी. 🎉🎉 end")


# ----------------------------------------------------------------------------- toy model folder
def build_toy(out: Path, tokenizer_json: Path, vocab: int, context: int = TOY_CONTEXT,
              layers: int = 2, widths=(32, 8), seed: int = 0) -> Path:
    """A model folder whose graph follows perseus_edge.modelfile with a trivially checkable body:
    h_0 = emb[ids]; per layer h += tanh(mean of the c_kv cache rows 0..p); logits = h @ head."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from perseus_edge.manifest import write_manifest
    from perseus_edge.model.config import preset

    out.mkdir(parents=True, exist_ok=True)
    cfg = preset("tiny", vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=context,
                 kv_lora_rank=widths[0], qk_rope_head_dim=widths[1])
    rng = np.random.default_rng(seed)
    consts = {"emb": rng.normal(size=(vocab, widths[0])).astype(np.float32),
              "head": rng.normal(size=(widths[0], vocab)).astype(np.float32),
              "crange": np.arange(context, dtype=np.int64), "zero": np.array([0], np.int64),
              "one": np.array([1], np.int64), "two": np.array([2], np.int64),
              "one_s": np.array(1, np.int64), "zero_s": np.array(0, np.int64),
              "minus1": np.array([-1], np.int64), "rw": np.array([widths[1]], np.int64)}
    inputs = [h.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
              h.make_tensor_value_info("position", T.INT64, ["batch"])]
    outputs = [h.make_tensor_value_info("logits", T.FLOAT, ["batch", "seq", vocab])]
    n = h.make_node
    # per-row positions: query t of row b sees cache rows 0..position[b]+t
    nodes = [n("Gather", ["emb", "input_ids"], ["x"]), n("Shape", ["input_ids"], ["ishape"]),
             n("Slice", ["ishape", "one", "two"], ["tdim"]), n("Squeeze", ["tdim"], ["t"]),
             n("Range", ["zero_s", "t", "one_s"], ["offsets"]), n("Unsqueeze", ["position", "one"], ["pcol"]),
             n("Add", ["pcol", "offsets"], ["qpos"]), n("Unsqueeze", ["qpos", "minus1"], ["qpos3"]),
             n("LessOrEqual", ["crange", "qpos3"], ["maskb"]), n("Cast", ["maskb"], ["mask"], to=T.FLOAT),
             n("ReduceSum", ["mask", "minus1"], ["cnt"], keepdims=1), n("Identity", ["position"], ["widx"])]
    acc = "x"
    for i in range(layers):
        for slot, w in zip(("c_kv", "k_rope"), widths):
            inputs.append(h.make_tensor_value_info(f"past.{i}.{slot}", T.FLOAT, ["batch", context, w]))
            outputs.append(h.make_tensor_value_info(f"present.{i}.{slot}", T.FLOAT, ["batch", context, w]))
        nodes += [n("TensorScatter", [f"past.{i}.c_kv", acc, "widx"], [f"present.{i}.c_kv"], axis=1),
                  n("Slice", [acc, "zero", "rw", "two"], [f"xr{i}"]),
                  n("TensorScatter", [f"past.{i}.k_rope", f"xr{i}", "widx"], [f"present.{i}.k_rope"], axis=1),
                  n("MatMul", ["mask", f"present.{i}.c_kv"], [f"s{i}"]), n("Div", [f"s{i}", "cnt"], [f"m{i}"]),
                  n("Tanh", [f"m{i}"], [f"t{i}"]), n("Add", [f"t{i}", acc], [f"h{i}"])]
        acc = f"h{i}"
    nodes.append(n("MatMul", [acc, "head"], ["logits"]))
    model = h.make_model(h.make_graph(nodes, "toy", inputs, outputs,
                                      [nh.from_array(v, k) for k, v in consts.items()]),
                         opset_imports=[h.make_opsetid("", 24)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, out / "model.onnx")
    cfg.save(out / "config.json")
    (out / "generation_config.json").write_text(json.dumps({"max_context": context, "eos_token_id": 0}))
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    write_manifest(out, "onnx")
    return out


def toy_logits(folder: Path, ids) -> np.ndarray:
    """numpy reference of the toy graph: logits [T, V] for one sequence."""
    import onnx
    from onnx import numpy_helper as nh

    m = onnx.load(folder / "model.onnx")
    w = {i.name: nh.to_array(i) for i in m.graph.initializer}
    layers = sum(1 for i in m.graph.input if i.name.endswith(".c_kv"))
    x = w["emb"][np.asarray(ids)].astype(np.float64)
    mask = np.tril(np.ones((len(ids), len(ids))))
    for _ in range(layers):
        x = np.tanh(mask @ x / mask.sum(1, keepdims=True)) + x
    return x @ w["head"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_toy(tmp_path_factory.mktemp("toy") / "model", tiny_tokenizer, 512)


@pytest.fixture(scope="module")
def export_arch(tmp_path_factory, make_checkpoint):
    """export_arch(arch) -> fp32 export of the tiny checkpoint."""
    from perseus_edge.build import export_checkpoint

    done: dict = {}

    def export(arch: str) -> Path:
        if arch not in done:
            done[arch] = export_checkpoint(make_checkpoint(arch), tmp_path_factory.mktemp("onnx") / arch)
        return done[arch]

    return export


@pytest.fixture(scope="module")
def exported(export_arch) -> Path:
    return export_arch("moe-mla-rope")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    from perseus_edge.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer)


# ----------------------------------------------------------------------------- sampler
def _logits(seed=0, vocab=100):
    return np.random.default_rng(seed).normal(size=vocab).astype(np.float32) * 3


def test_greedy_is_argmax():
    for seed in range(5):
        x = _logits(seed)
        assert Sampler().sample(x, []) == int(np.argmax(x))
        assert Sampler(temperature=0.0, seed=1).sample(x, [1, 2]) == int(np.argmax(x))
    tie = np.array([1.0, 5.0, 5.0, 0.0], np.float32)
    assert Sampler().sample(tie, []) == 1  # lowest id wins a tie


def test_top_k_1_and_tiny_top_p_are_greedy():
    for seed in range(20):
        x = _logits(seed)
        g = int(np.argmax(x))
        assert Sampler(temperature=1.5, top_k=1, seed=seed).sample(x, []) == g
        assert Sampler(temperature=1.5, top_p=1e-9, seed=seed).sample(x, []) == g


def test_seeded_sampling_is_reproducible():
    x = _logits(3)

    def draw(seed):
        s = Sampler(temperature=1.0, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=seed)
        hist, out = [], []
        for _ in range(50):
            out.append(s.sample(x, hist))
            hist.append(out[-1])
        return out

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_top_p_support_and_frequencies():
    x = _logits(4, vocab=20)
    s = Sampler(temperature=0.7, top_k=5, top_p=0.8, seed=0)
    p = s.probs(x)
    assert np.isclose(p.sum(), 1.0)
    top5 = set(np.argsort(-x)[:5].tolist())
    support = set(np.flatnonzero(p).tolist())
    assert support <= top5
    counts = np.bincount([s.sample(x) for _ in range(4000)], minlength=20) / 4000
    assert set(np.flatnonzero(counts).tolist()) <= support
    assert np.abs(counts - p).max() < 0.03


def test_repetition_penalty_matches_hf():
    x = np.array([2.0, -1.0, 0.5, -3.0, 1.0], np.float32)
    s = Sampler(repetition_penalty=2.0)
    out = s.penalize(x, [0, 1, 1, 3])
    assert np.allclose(out, [1.0, -2.0, 0.5, -6.0, 1.0])  # positive / p, negative * p, once per id
    assert s.sample(np.array([3.0, 2.0], np.float32), [0]) == 1  # 1.5 < 2.0: the repeat loses
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    proc = transformers.RepetitionPenaltyLogitsProcessor(1.3)
    logits = _logits(5, vocab=50)
    hist = [3, 7, 7, 11, 49, 0]
    ref = proc(torch.tensor([hist]), torch.tensor(logits)[None].clone())[0].numpy()
    assert np.allclose(Sampler(repetition_penalty=1.3).penalize(logits, hist), ref, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"), (dict(temperature=float("nan")), "temperature"),
    (dict(seed=-3), "seed"),
])
def test_sampler_parameter_errors(kwargs, match):
    with pytest.raises(PerseusError, match=match):
        Sampler(**kwargs)


# ----------------------------------------------------------------------------- streaming text
def test_stream_utf8_equals_full_decode(tok):
    ids = tok.encode(UNICODE_TEXT, add_special_tokens=False).ids
    assert tok.decode(ids) == UNICODE_TEXT
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == UNICODE_TEXT
    assert not any("\ufffd" in p for p in pieces)  # no half characters ever printed
    # with a 512-token vocabulary, multi-byte characters really are split over tokens
    table = token_bytes_table(tok)
    assert any(len(table[i]) and not _valid_utf8(table[i]) for i in ids)
    # special tokens decode like the tokenizer does
    eos = [0] + ids[:5]
    s2 = TextStream(tok)
    assert "".join([s2.push(i) for i in eos] + [s2.flush()]) == tok.decode(eos, skip_special_tokens=False)


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stream_generic_path_and_incomplete_tail(tok):
    ids = tok.encode("東京🤖", add_special_tokens=False).ids
    generic = TextStream(tok, table=None)
    generic.table = None
    assert "".join([generic.push(i) for i in ids] + [generic.flush()]) == "東京🤖"
    s = TextStream(tok)  # a cut-off character becomes U+FFFD at the end, as in a full decode
    cut = ids[:-1]
    assert "".join([s.push(i) for i in cut] + [s.flush()]) == tok.decode(cut)


def test_stop_filter_holds_back_split_stop_strings():
    f = StopFilter(["THE END", "\n\n"])
    out = "".join(f.push(p) for p in ["Once", " upon TH", "E E", "ND and more"]) + f.flush()
    assert out == "Once upon " and f.stopped
    f = StopFilter(["THE END"])
    out = "".join(f.push(p) for p in ["a TH", "E", " dog"]) + f.flush()
    assert out == "a THE dog" and not f.stopped
    f = StopFilter([])
    assert f.push("abc") == "abc"


# ----------------------------------------------------------------------------- generation (toy)
def test_toy_generation_matches_numpy_reference(toy):
    from perseus_edge.runtime.generate import Generator

    gen = Generator(toy, threads=1)
    res = gen.generate("Once upon a time", max_new_tokens=20, ignore_eos=True)
    ids = list(res.prompt_tokens)
    for _ in range(20):
        ids.append(int(np.argmax(toy_logits(toy, ids)[-1])))
    assert res.tokens == ids[len(res.prompt_tokens):]
    assert res.stop_reason == "length" and len(res.tokens) == 20
    t = res.timings
    assert t.prompt_tokens == len(res.prompt_tokens) and t.decode_tokens == 19
    assert t.decode_tok_s > 0 and t.ttft_s > 0 and t.peak_rss > 0
    assert "tokens per second" in t.report()
    # streaming gives the same text, and the full logits of a prefill match the reference
    pieces = list(gen.stream("Once upon a time", 20, ignore_eos=True))
    assert "".join(pieces) == res.text == gen.tokenizer.decode(res.tokens)
    logits = gen.model.forward(np.array([ids]), 0)[0]
    assert np.allclose(logits, toy_logits(toy, ids), atol=1e-4)


def test_cache_buffers_bound_in_place(toy):
    from perseus_edge.runtime.generate import Generator

    gen = Generator(toy, threads=1)
    cache = gen.model.cache
    ptrs = cache.data_ptrs()
    arrays = [a.ctypes.data for a in cache.arrays]
    assert ptrs == arrays  # the OrtValues wrap our numpy buffers, no copy
    seen = []
    forward = gen.model.forward

    def spy(ids, position, **kwargs):
        out = forward(ids, position, **kwargs)
        bound = {v.data_ptr() for v in gen.model.binding.get_outputs()}
        seen.append((cache.data_ptrs(), set(ptrs) <= bound, position, ids.shape[1]))
        return out

    gen.model.forward = spy
    res = gen.generate("Once upon a time", 10, ignore_eos=True)
    assert len(seen) == 10 and all(p == ptrs and inside for p, inside, _, _ in seen)
    # the graph wrote exactly the rows of the fed tokens, in place, into our buffers
    n_fed = len(res.prompt_tokens) + len(res.tokens) - 1
    c_kv = cache.arrays[0][0]
    assert np.abs(c_kv[:n_fed]).sum() > 0 and np.all(c_kv[n_fed:] == 0)
    # decode steps reuse one logits buffer too
    rows = gen.model._all
    assert rows.step_bound and rows._logits_v.data_ptr() == rows.logits.ctypes.data


def test_context_overflow_and_truncate_left(toy, tok):
    from perseus_edge.runtime.generate import Generator

    gen = Generator(toy, threads=1)
    long_ids = tok.encode("word " * 200, add_special_tokens=False).ids
    assert len(long_ids) > TOY_CONTEXT
    with pytest.raises(PerseusError, match="context is 64.*--truncate left"):
        gen.generate(long_ids, 10)
    res = gen.generate(long_ids, 10, truncate="left", ignore_eos=True)
    assert res.prompt_tokens == long_ids[-(TOY_CONTEXT - 10):] and res.truncated == len(long_ids) - 54
    assert len(res.tokens) == 10 and "prompt truncated" in res.note
    # the prompt fits but prompt + n does not: stop at the context end, with a note
    res = gen.generate(long_ids[:60], 10, ignore_eos=True)
    assert len(res.tokens) == 4 and res.stop_reason == "context" and "context full" in res.note
    for n in (0, -1, TOY_CONTEXT, 10**6):
        with pytest.raises(PerseusError):
            gen.generate("hi", n)
    with pytest.raises(PerseusError, match="empty prompt"):
        gen.generate("", 5)
    with pytest.raises(PerseusError, match="truncate"):
        gen.generate("hi", 5, truncate="right")


def test_stop_strings_and_tokens(toy):
    from perseus_edge.runtime.generate import Generator

    gen = Generator(toy, threads=1)
    full = gen.generate("Once upon a time", 30, ignore_eos=True)
    stop = full.text[5:9]
    assert stop and stop not in full.text[:5]
    res = gen.generate("Once upon a time", 30, stop=[stop], ignore_eos=True)
    assert res.stop_reason == "stop" and res.text == full.text[: full.text.index(stop)]
    res = gen.generate("Once upon a time", 30, stop_tokens=[full.tokens[3]], ignore_eos=True)
    assert res.tokens == full.tokens[: full.tokens.index(full.tokens[3]) + 1] and res.stop_reason == "stop"
    eos = full.tokens[6]
    first = full.tokens.index(eos)
    gen.eos_ids = {eos}  # as if generation_config.json named it
    res = gen.generate("Once upon a time", 30)
    assert res.stop_reason == "eos" and res.tokens == full.tokens[: first + 1]
    assert res.text == gen.tokenizer.decode(full.tokens[:first])  # the EOS token is not printed
    assert gen.generate("Once upon a time", 30, ignore_eos=True).tokens == full.tokens


def test_low_memory_and_ort_format_toy(toy, tmp_path):
    from perseus_edge.runtime.generate import Generator
    from perseus_edge.lower.ort_format import convert_to_ort

    ref = Generator(toy, threads=1).generate("Once upon a time", 12, ignore_eos=True)
    low = Generator(toy, threads=1, low_memory=True).generate("Once upon a time", 12, ignore_eos=True)
    assert low.tokens == ref.tokens
    folder = shutil.copytree(toy, tmp_path / "m")
    with pytest.raises(PerseusError, match="to-ort"):
        Generator(folder, format="ort")
    convert_to_ort(folder)
    assert (folder / "model.ort").is_file() and (folder / "model.required_operators.config").is_file()
    gen = Generator(folder, format="ort")
    assert gen.model.folder.graph.name == "model.ort"
    assert gen.generate("Once upon a time", 12, ignore_eos=True).tokens == ref.tokens


def test_evaluate_toy_matches_reference(toy, tok):
    from perseus_edge.data import eval_batches
    from perseus_edge.runtime.evaluate import evaluate

    text = UNICODE_TEXT * 20
    ids = np.array(tok.encode(text, add_special_tokens=False).ids)
    r = evaluate(toy, text, seq_len=32, max_batches=2, batch_size=3, threads=1)
    total, count = 0.0, 0
    for x, y in eval_batches(ids, 32, 3, 2):
        for row, target in zip(x, y):
            lg = toy_logits(toy, row)
            lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
            total += float((lse - lg[np.arange(len(target)), target]).sum())
            count += len(target)
    assert r["tokens"] == count == 2 * 3 * 32
    assert abs(r["loss"] - total / count) < 1e-4 and np.isclose(r["ppl"], np.exp(r["loss"]))
    r_all = evaluate(toy, ids, seq_len=32, batch_size=4)  # partial last batch is padded, not scored
    assert r_all["tokens"] == (len(ids) - 1) // 32 * 32
    with pytest.raises(PerseusError, match="seq_len"):
        evaluate(toy, ids, seq_len=TOY_CONTEXT + 1)


# ----------------------------------------------------------------------------- folder checks
def _rewrite_manifest(folder: Path) -> None:
    from perseus_edge.manifest import write_manifest

    write_manifest(folder, json.loads((folder / "manifest.json").read_text())["kind"])


@pytest.fixture(scope="module")
def broken(toy, tmp_path_factory, valid_text) -> dict:
    """Model folders that must be refused, each with the message it must give."""
    from perseus_edge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("broken")
    corrupt = shutil.copytree(toy, root / "corrupt")
    data = bytearray((corrupt / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "model.onnx").write_bytes(bytes(data))
    truncated = shutil.copytree(toy, root / "truncated")
    (truncated / "model.onnx").write_bytes((truncated / "model.onnx").read_bytes()[:-10])
    vocab = shutil.copytree(toy, root / "vocab")
    src = root / "text.txt"
    src.write_text(valid_text[:50_000], encoding="utf-8")
    train_tokenizer([src], vocab_size=400, out_path=vocab / "tokenizer.json")
    _rewrite_manifest(vocab)
    nomanifest = shutil.copytree(toy, root / "nomanifest")
    (nomanifest / "manifest.json").unlink()
    return {"missing": (root / "nope", "model folder not found"),
            "corrupt": (corrupt, "sha256"), "truncated": (truncated, "truncated"),
            "vocab": (vocab, "400 tokens but"), "nomanifest": (nomanifest, "no manifest.json")}


def test_bad_folders_are_refused(broken):
    from perseus_edge.runtime.generate import Generator

    for folder, msg in broken.values():
        with pytest.raises(PerseusError, match=msg):
            Generator(folder)


# ----------------------------------------------------------------------------- CLI
def perseus(*args, stdin: str | bytes | None = None, env=None, timeout=120):
    cmd = [sys.executable, "-m", "perseus_edge.cli", *map(str, args)]
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_cli_run_streams_text_and_timings(toy):
    from perseus_edge.runtime.generate import Generator

    p = perseus("run", toy, "-p", "Once upon a time", "-n", 12, "--threads", 1, "--ignore-eos")
    assert p.returncode == 0, p.stderr.decode()
    expect = Generator(toy, threads=1).generate("Once upon a time", 12, ignore_eos=True).text
    assert p.stdout.decode() == "Once upon a time" + expect + "\n"
    err = p.stderr.decode()
    assert "prompt eval time" in err and "tokens per second" in err and "peak RSS" in err


def test_cli_bad_input_is_one_line_error(toy, broken, tmp_path):
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"Once upon \xff\xfe a time")
    cases = [(["run", folder, "-p", "hi"], msg) for folder, msg in broken.values()] + [
        (["run", toy, "-p", ""], "empty prompt"),
        (["run", toy, "--prompt-file", bad_utf8], "not valid UTF-8"),
        (["run", toy, "-p", "hi", "--temperature", "-1"], "temperature"),
        (["run", toy, "-p", "hi", "--top-p", "1.5"], "top_p"),
        (["run", toy, "-p", "hi", "-n", "0"], "-n must be at least 1"),
        (["run", toy, "-p", "hi", "-n", "100000"], "context of 64"),
        (["run", toy, "-p", "word " * 100], "--truncate left"),
        (["run", toy, "-p", "hi", "--threads", "0"], "threads"),
        (["run", toy], "no prompt"),
        (["run", toy, "-p", "hi", "--format", "ort"], "no model.ort"),
    ]
    for args, msg in cases:
        p = perseus(*args)
        err = p.stderr.decode()
        assert p.returncode == 1, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
        assert err.startswith("error: ") and msg in err, (args, err)


def test_cli_interactive_and_truncate(toy):
    p = perseus("run", toy, "-i", "-n", 5, stdin=b"Once upon\n\nthe dog\n")  # then Ctrl-D (EOF)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stderr.decode().count("prompt eval time") == 2  # two answers, the blank line skipped
    assert "Traceback" not in p.stderr.decode()
    p = perseus("run", toy, "-p", "word " * 100, "-n", 5, "--truncate", "left", "--no-timings")
    assert p.returncode == 0 and "prompt truncated" in p.stderr.decode()


def test_cli_ctrl_c_stops_cleanly_with_timings(toy, capsys, monkeypatch):
    import typer

    from perseus_edge.cli import run as commands
    from perseus_edge.runtime.model import Model

    calls = {"n": 0}
    forward = Model.forward

    def interrupt_on_fifth(self, ids, position, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return forward(self, ids, position, **kwargs)

    monkeypatch.setattr(Model, "forward", interrupt_on_fifth)
    with pytest.raises(typer.Exit) as exit_info:
        commands.run(toy, prompt="Once upon a time", prompt_file=None, n=30, threads=1, temperature=None,
                     top_k=None, top_p=None, repeat_penalty=None, seed=None, stop=None, ignore_eos=True,
                     truncate="none", low_memory=False, format="auto", verify=True, interactive=False,
                     echo=True, show_timings=True)
    assert exit_info.value.exit_code == 130
    out = capsys.readouterr()
    assert "interrupted" in out.err and "eval time" in out.err and "Traceback" not in out.err
    assert out.out.startswith("Once upon a time")


# ----------------------------------------------------------------------------- torch-free
def test_runtime_runs_without_torch(toy, exported_or_toy):
    code = textwrap.dedent(f"""
        try:
            import torch
            raise SystemExit("torch was importable")
        except ImportError:
            pass
        from perseus_edge.runtime.generate import Generator
        from perseus_edge.runtime.evaluate import evaluate
        import perseus_edge.cli.run, perseus_edge.cli
        gen = Generator({str(exported_or_toy)!r}, threads=1)
        res = gen.generate("Once upon a time", 8, temperature=0.8, top_p=0.9, seed=0)
        assert res.tokens, res
        print(evaluate({str(toy)!r}, "Once upon a time there was a dog. " * 20, seq_len=16)["ppl"])
        sys.argv = ["perseus", "run", {str(exported_or_toy)!r}, "-p", "Hi", "-n", "4", "--no-timings"]
        try:  # the real CLI entry point, with every stage's commands registered
            perseus_edge.cli.main()
        except SystemExit as e:
            assert not e.code, e.code
        assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        print("ok", res.tokens)
    """)
    p = run_without_torch(code, timeout=120)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr


@pytest.fixture(scope="module")
def exported_or_toy(request, toy):
    try:
        return request.getfixturevalue("exported")
    except pytest.skip.Exception:
        return toy


# ----------------------------------------------------------------------------- exported model
@pytest.mark.parametrize("arch", ["moe-mla-rope", "mha"])
def test_parity_with_pytorch_reference(arch, export_arch, make_checkpoint):
    import torch

    from perseus_edge.checkpoint import load_checkpoint
    from perseus_edge.reference import generate_tokens
    from perseus_edge.runtime.generate import Generator

    model, _ = load_checkpoint(make_checkpoint(arch))
    model.eval()
    gen = Generator(export_arch(arch), threads=1)
    prompt = gen.encode("Once upon a time, a small robot")
    n = 24
    res = gen.generate(prompt, n, temperature=0.0, ignore_eos=True)
    ref = list(generate_tokens(model, prompt, n, Sampler(), eos_id=None))
    assert res.tokens == ref
    # logits of the prefill and of every decode step, from the cache, within 1e-4
    ids = prompt + res.tokens[:-1]
    gen.model.cache.reset()
    with torch.no_grad():
        full, _ = model(torch.tensor([ids]))
        lg = gen.model.forward(np.array([prompt]), 0)[0]
        assert np.abs(lg - full[0, : len(prompt)].numpy()).max() < 1e-4
        for i, t in enumerate(res.tokens[:-1]):
            step = gen.model.forward(np.array([[t]]), len(prompt) + i)[0, 0]
            assert np.abs(step - full[0, len(prompt) + i].numpy()).max() < 1e-4


def test_last_only_prefill_is_the_last_row(exported, toy):
    """`forward(last_only=True)` equals the last row of every-row logits; an exported graph computes
    that row alone (logits_rows), a folder from before logits_rows (the toy) is sliced after the run."""
    from perseus_edge.runtime.model import PREFILL_CHUNK_FP32, PREFILL_CHUNK_LOW_MEMORY, Model

    assert Model(exported, threads=1, low_memory=True).prefill_chunk == PREFILL_CHUNK_LOW_MEMORY
    for folder, graph_rows in ((exported, True), (toy, False)):
        model = Model(folder, threads=1)
        assert model.spec.logits_rows is graph_rows
        assert model.prefill_chunk == PREFILL_CHUNK_FP32  # both hold fp32 weights (kind "onnx")
        ids = np.arange(3, 40, dtype=np.int64)[None] % model.spec.vocab_size
        full = model.forward(ids, 0).copy()
        # with logits_rows the session writes one row into a [1, 1, vocab] buffer (onnxruntime
        # refuses a bound output of another shape): the head ran on that row alone
        last = model.forward(ids, 0, last_only=True)
        assert full.shape[1] == ids.shape[1] and last.shape == (1, 1, model.spec.vocab_size)
        np.testing.assert_allclose(last[0, 0], full[0, -1], rtol=0, atol=1e-5)
        step = model.forward(np.array([[5]]), ids.shape[1])  # one-token steps bind their own row
        assert step.shape == (1, 1, model.spec.vocab_size)


def test_exported_ort_format_same_tokens(exported, tmp_path):
    from perseus_edge.runtime.generate import Generator
    from perseus_edge.lower.ort_format import convert_to_ort

    folder = shutil.copytree(exported, tmp_path / "m")
    convert_to_ort(folder)
    ops = (folder / "model.required_operators.config").read_text()
    assert "ai.onnx" in ops
    a = Generator(folder, threads=1).generate("Once upon a time", 16, temperature=0.0, ignore_eos=True)
    b = Generator(folder, threads=1, format="ort").generate("Once upon a time", 16, temperature=0.0,
                                                           ignore_eos=True)
    c = Generator(folder, threads=1, low_memory=True).generate("Once upon a time", 16, temperature=0.0,
                                                              ignore_eos=True)
    assert a.tokens == b.tokens == c.tokens


def test_exported_evaluate_matches_pytorch(exported, make_checkpoint, valid_text):
    import torch

    from perseus_edge.checkpoint import load_checkpoint
    from perseus_edge.runtime.evaluate import evaluate
    from perseus_edge.tokenizer import load_tokenizer
    from perseus_edge.train import evaluate as torch_evaluate

    tok = load_tokenizer(exported / "tokenizer.json")
    ids = np.array(tok.encode(valid_text[:20_000], add_special_tokens=False).ids)
    model, _ = load_checkpoint(make_checkpoint("moe-mla-rope"))
    ref = torch_evaluate(model, ids, 64, 4, 3, torch.device("cpu"))
    r = evaluate(exported, ids, seq_len=64, max_batches=3, batch_size=4, threads=1)
    assert r["tokens"] == 3 * 4 * 64 and abs(r["loss"] - ref) < 1e-4


def test_demo_exports_once_then_uses_cache(make_checkpoint, tmp_path, monkeypatch, capsys):
    from perseus_edge.cli import run as commands

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ckpt = make_checkpoint("moe-mla-rope")
    args = dict(checkpoint=ckpt, prompt="Once upon a time", n=8, threads=1, temperature=None, top_k=None,
                top_p=None, seed=0, quantize=True)
    commands.demo(**args)
    first = capsys.readouterr()
    assert "first run" in first.err and "tokens per second" in first.err
    assert first.out.startswith("Once upon a time")
    commands.demo(**args)
    second = capsys.readouterr()
    assert "first run" not in second.err and second.out == first.out  # cached, same seed
    assert list((tmp_path / "cache" / "perseus-edge" / "builds").iterdir())


def test_demo_build_leaves_the_caller_torch_free(make_checkpoint, tmp_path):
    """The first-run build happens in a child process: the demo's own process (whose peak RSS the
    demo reports) never imports torch, so that figure is the runtime's, as on every later run."""
    import subprocess
    import sys

    code = ("import sys; from perseus_edge.cli.demo import prepare; "
            "folder = prepare(sys.argv[1], log=lambda m: None); "
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules, 'imported in the caller'; "
            "print(folder)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code, str(make_checkpoint("moe-mla-rope"))], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (Path(r.stdout.strip()) / "model.onnx").is_file()


def test_demo_without_default_model_says_so(monkeypatch, tmp_path):
    from perseus_edge.cli import demo

    monkeypatch.setattr(demo, "default_checkpoint", lambda: tmp_path / "none")
    with pytest.raises(PerseusError, match="--checkpoint"):
        demo.prepare(None)


def test_interactive_ctrl_c_at_the_prompt_exits_cleanly(toy, capsys, monkeypatch):
    from perseus_edge.cli import run as commands

    lines = iter(["Once upon a time"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise KeyboardInterrupt from None

    monkeypatch.setattr("builtins.input", fake_input)
    commands.run(toy, prompt=None, prompt_file=None, n=5, threads=1, temperature=0.0, top_k=None, top_p=None,
                 repeat_penalty=None, seed=None, stop=None, ignore_eos=True, truncate="none",
                 low_memory=False, format="auto", verify=True, interactive=True, echo=True, show_timings=True)
    err = capsys.readouterr().err
    assert err.count("prompt eval time") == 1 and "Traceback" not in err
