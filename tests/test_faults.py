"""The bad-input and fault battery: every command, as a user would break it.

Each case runs a `perseus` command and asserts three things: the exit code, the message (one
`error:` line naming the problem, no traceback) and the state on disk (sources untouched, no
half-written output, no leftovers). Most cases call the CLI in this process (`perseus_edge.cli.main`
with an argv: the same code path, without an interpreter start per case); kills, Ctrl-C and races
need a real process and use a subprocess. Faults inside writes are injected with the test hook
PERSEUS_FAULT=point[@N][:action] (perseus_edge/atomic.py): kill (SIGKILL), int (SIGINT), enospc
(disk full), erofs (read-only file system), eio.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from perseus_edge.atomic import writer_lock
from perseus_edge.cli import main
from perseus_edge.manifest import read_manifest, verify_folder, write_manifest


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(capsys, *args) -> Result:
    """`perseus ARGS` in this process."""
    from perseus_edge import atomic

    atomic._hits.clear()  # the fault hook counts passes per process
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return Result(code, out.out, out.err)


def sub(*args, env: dict | None = None, timeout: int = 240) -> Result:
    """`perseus ARGS` in a fresh process (kills, signals, races)."""
    proc = subprocess.run([sys.executable, "-m", "perseus_edge.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return Result(proc.returncode, proc.stdout, proc.stderr)


def one_error(r: Result, fragment: str, code: int = 1) -> None:
    """Exit `code`, stderr exactly one line `error: ...` containing `fragment`, nothing on stdout."""
    assert "Traceback" not in r.err, r.err
    progress = ("━", "%|", "tokenizing ")  # rich / tqdm bars of long work, then the error
    lines = [ln for ln in r.err.splitlines()
             if ln.strip() and not ln.startswith("note: ") and not any(p in ln for p in progress)]
    assert r.code == code, (r.code, r.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err[-2000:]
    assert fragment in lines[0], lines[0]
    assert r.out.strip() == "" or "error" not in r.out, r.out


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every entry under `folder` (what must not change)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    """Temp/old/lock leftovers beside or inside a folder."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- shared models
@pytest.fixture(scope="session")
def ckpt(make_checkpoint) -> Path:
    return make_checkpoint()


@pytest.fixture(scope="session")
def onnx_model(ckpt, tmp_path_factory) -> Path:
    """One exported tiny model for the whole battery (never modified: tests copy it)."""
    from perseus_edge.build import export_checkpoint

    return export_checkpoint(ckpt, tmp_path_factory.mktemp("faults") / "onnx")


@pytest.fixture
def model_copy(onnx_model, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(onnx_model, folder)
    return folder


@pytest.fixture
def ckpt_copy(ckpt, tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    return folder


# ----------------------------------------------------------------------------- flags out of range
BAD_FLAGS = [
    # (command line with {ckpt} / {model} / {tmp}, fragment, exit code)
    ("info --context 0", "--context must be at least 1", 1),
    ("info --context -100", "--context must be at least 1", 1),
    ("info --preset 7b", "unknown preset '7b'", 1),
    ("info --preset tiny --arch rwkv", "unknown architecture 'rwkv'", 1),
    ("info --config {tmp}/none.json", "config not found", 1),
    ("info --context abc", "Invalid value for '--context'", 2),
    ("train --steps 0 -o {tmp}/r", "--steps must be a positive integer, got 0", 1),
    ("train --steps -3 -o {tmp}/r", "--steps must be a positive integer, got -3", 1),
    ("train --batch-size 0 -o {tmp}/r", "--batch-size must be a positive integer", 1),
    ("train --seq-len 0 -o {tmp}/r", "--seq-len must be a positive integer", 1),
    ("train --seq-len -5 -o {tmp}/r", "--seq-len must be a positive integer", 1),
    ("train --lr nan -o {tmp}/r", "--lr must be a positive finite number, got nan", 1),
    ("train --lr inf -o {tmp}/r", "--lr must be a positive finite number, got inf", 1),
    ("train --lr -1 -o {tmp}/r", "--lr must be a positive finite number", 1),
    ("train --lr 0 -o {tmp}/r", "--lr must be a positive finite number", 1),
    ("train --adam-lr nan -o {tmp}/r", "--adam-lr must be a positive finite number", 1),
    ("train --weight-decay -0.1 -o {tmp}/r", "--weight-decay must be a finite number >= 0", 1),
    ("train --weight-decay nan -o {tmp}/r", "--weight-decay must be a finite number >= 0", 1),
    ("train --warmup -1 -o {tmp}/r", "--warmup must be a finite number >= 0", 1),
    ("train --eval-every 0 -o {tmp}/r", "--eval-every must be a positive integer", 1),
    ("train --eval-batches 0 -o {tmp}/r", "--eval-batches must be a positive integer", 1),
    ("train --max-chars 0 -o {tmp}/r", "--max-chars must be a positive integer", 1),
    ("train --router-bias-rate -1 -o {tmp}/r", "--router-bias-rate must be a finite number >= 0", 1),
    ("train --router-bias-rate nan -o {tmp}/r", "--router-bias-rate must be a finite number >= 0", 1),
    ("train --seed -1 -o {tmp}/r", "--seed must be a finite number >= 0", 1),
    ("train --optimizer sgd -o {tmp}/r", "unknown optimizer 'sgd'", 1),
    ("train --resume --force -o {tmp}/r", "give one of them", 1),
    ("train --resume -o {tmp}/r", "nothing to resume", 1),
    ("train --preset 7b -o {tmp}/r", "unknown preset '7b'", 1),
    ("train --arch rwkv -o {tmp}/r", "unknown architecture 'rwkv'", 1),
    ("train --seq-len 100000 -o {tmp}/r", "seq_len 100000 exceeds the model context", 1),
    ("train --data-dir {tmp}/nowhere -o {tmp}/r", "data folder not found", 1),
    ("train --tokenizer {tmp}/none.json -o {tmp}/r", "tokenizer file not found", 1),
    ("train --steps x", "Invalid value for '--steps'", 2),
    ("train --no-such-flag", "No such option: --no-such-flag", 2),
    ("eval {ckpt} --seq-len 0", "--seq-len must be at least 1, got 0", 1),
    ("eval {model} --seq-len 0", "--seq-len must be at least 1, got 0", 1),
    ("eval {model} --seq-len -4", "--seq-len must be at least 1", 1),
    ("eval {ckpt} --batch-size 0", "--batch-size must be at least 1", 1),
    ("eval {model} --max-batches 0", "--max-batches must be at least 1", 1),
    ("eval {model} --threads 0", "--threads must be at least 1", 1),
    ("eval {model} --split dev", "unknown split 'dev'", 1),
    ("eval {model} --batch-size 100000000", "lower --batch-size", 1),
    ("eval {ckpt} --seq-len 100000", "seq_len 100000 exceeds the model context", 1),
    ("eval {model} --seq-len 100000", "exceeds the model's context", 1),
    ("eval {tmp}/none", "model folder not found", 1),
    ("eval {model} --data-dir {tmp}/nowhere", "data folder not found", 1),
    ("generate {ckpt} -p Once -n 0", "-n must be positive", 1),
    ("generate {ckpt} -p Once --temperature -1", "temperature must be >= 0", 1),
    ("generate {ckpt} -p Once --temperature nan", "must be a finite number", 1),
    ("generate {ckpt} -p Once --top-p 0", "top_p must be in (0, 1]", 1),
    ("generate {ckpt} -p Once --top-p 1.5", "top_p must be in (0, 1]", 1),
    ("generate {ckpt} -p Once --top-k -1", "top_k must be an integer >= 0", 1),
    ("generate {ckpt} -p Once --repeat-penalty 0", "repetition_penalty must be > 0", 1),
    ("generate {ckpt} -p Once --seed -2", "seed must be a non-negative integer", 1),
    ("generate {ckpt} -p Once --device cuda", "--device cuda: this torch", 1),
    ("generate {ckpt} -p Once --device cuda:7", "--device cuda:7", 1),
    ("generate {ckpt} -p Once --device tpu", "--device", 1),
    ("generate {ckpt} -p Once --device nonsense", "unknown --device 'nonsense'", 1),
    ("generate {tmp}/none -p Once", "model folder not found", 1),
    ("generate {model} -p Once", "expected checkpoint", 1),
    ("export {ckpt} -o {tmp}/o --max-context 0", "--max-context must be positive", 1),
    ("export {ckpt} -o {tmp}/o --max-context -5", "--max-context must be positive", 1),
    ("export {ckpt} -o {tmp}/o --max-context 100000", "exceeds the model's max_position_embeddings", 1),
    ("export {ckpt} -o {tmp}/o --target gpu", "unknown target 'gpu'", 1),
    ("export {tmp}/none -o {tmp}/o", "checkpoint folder not found", 1),
    ("export {model} -o {tmp}/o", "expected checkpoint", 1),
    ("quantize {model} -o {tmp}/q --scheme int3", "unknown scheme 'int3'", 1),
    ("quantize {model} -o {tmp}/q --scheme int4 --block-size 7", "--block-size must be a power of two", 1),
    ("quantize {model} -o {tmp}/q --scheme int4 --block-size -32", "--block-size must be a power of two", 1),
    ("quantize {model} -o {tmp}/q --scheme int8 --kv-cache int2", "unknown --kv-cache 'int2'", 1),
    ("quantize {model} -o {tmp}/q --scheme int4 --method gptq", "unknown method 'gptq'", 1),
    ("quantize {model} -o {tmp}/q --scheme int4 --format fp8", "unknown --format 'fp8'", 1),
    ("quantize {model} -o {tmp}/q --scheme int8 --embeddings int2", "unknown --embeddings 'int2'", 1),
    ("quantize {model} -o {tmp}/q --scheme int8 --target tpu", "unknown target 'tpu'", 1),
    ("quantize {model} -o {tmp}/q --scheme fp32", "only makes sense with --kv-cache int8", 1),
    ("quantize {ckpt} -o {tmp}/q --scheme int8", "is a training checkpoint: export it first", 1),
    ("quantize {tmp}/none -o {tmp}/q --scheme int8", "model folder not found", 1),
    ("quantize {model} --scheme int8", "Missing option '-o'", 2),
    ("run {model} -p Once -n 0", "-n must be at least 1, got 0", 1),
    ("run {model} -p Once -n -5", "-n must be at least 1", 1),
    ("run {model} -p Once --threads 0", "--threads must be at least 1", 1),
    ("run {model} -p Once --truncate middle", "--truncate must be one of", 1),
    ("run {model} -p Once --temperature -1", "temperature must be >= 0", 1),
    ("run {model} -p Once --top-p 0", "top_p must be in (0, 1]", 1),
    ("run {model} -p Once --top-k -3", "top_k must be an integer >= 0", 1),
    ("run {model} -p Once --repeat-penalty -1", "repetition_penalty must be > 0", 1),
    ("run {model} -p Once --seed -1", "seed must be a non-negative integer", 1),
    ("run {model}", "no prompt", 1),
    ("run {model} -p Once -f {tmp}/p.txt", "not both", 1),
    ("run {model} -f {tmp}/none.txt", "cannot read prompt file", 1),
    ("run {model} -f {tmp}", "is a folder", 1),
    ("run {model} -f /dev/zero", "larger than 16 MiB", 1),
    ("run {model} -p Once --format gguf", "unknown model format 'gguf'", 1),
    ("run {model} -p Once --format ort", "has no model.ort", 1),
    ("run {model} -p Once -n 100000", "do not fit the model's context", 1),
    ("run {tmp}/none -p Once", "model folder not found", 1),
    ("run {ckpt} -p Once", "is a training checkpoint", 1),
    ("run {model} -p ''", "empty prompt", 1),
    ("inspect {tmp}/none", "model folder not found", 1),
    ("inspect {tmp}", "no manifest.json", 1),
    ("to-ort {model} --platform riscv", "unknown platform 'riscv'", 1),
    ("to-ort {tmp}/none", "model folder not found", 1),
    ("to-ort {ckpt}", "is not an exported ONNX model folder", 1),
    ("profile {model} -o {tmp}/p.txt --no-measure --no-ops", "is an existing file", 1),
    ("profile {model} -o {tmp}/prof --threads 0", "must be positive", 1),
    ("profile {ckpt} -o {tmp}/prof", "is not an exported model folder", 1),
    ("bench -m {model} -r 0", "-r takes an integer >= 1", 1),
    ("bench -m {model} -t a", "-t takes a comma-separated list of integers", 1),
    ("bench -m {model} -t 0", "-t takes integers >= 1", 1),
    ("bench -m {model} -p -5", "-p takes integers >= 0", 1),
    ("bench -m {model} -p 0 -n 0", "nothing to run", 1),
    ("bench -m {model} -o xml", "-o takes one of", 1),
    ("bench -m {tmp}/none", "model not found", 1),
    ("bench -m {ckpt}", "is not a model folder", 1),
    ("bench -m {model} -p 100000 -n 0", "positions", 1),
    ("demo -n 0", "-n must be at least 1", 1),
    ("demo --temperature -1", "temperature must be >= 0", 1),
    ("demo --checkpoint {tmp}/none", "model folder not found", 1),
    ("demo --checkpoint {model}", "is not a training checkpoint", 1),
    ("train-tokenizer -o {tmp}/t.json --vocab-size 10", "vocab_size 10 is too small", 1),
    ("train-tokenizer -o {tmp}/t.json --vocab-size 100000", "--vocab-size 100000 is too large", 1),
    ("train-tokenizer -o {tmp}", "is a folder", 1),
    ("train-tokenizer -o {tmp}/t.json --data-dir {tmp}/nowhere", "data folder not found", 1),
    ("bench -m {model} -n x", "-n takes a comma-separated list of integers", 1),
    ("bench -m {model} -n -1", "-n takes integers >= 0", 1),
    ("bench -m {model} -d 8,y", "-d takes a comma-separated list of integers", 1),
    ("bench -m {model} -t 1 -r 1 -p 8 -n 0 -m {tmp}/p.txt", "is neither a model folder nor a .gguf file", 1),
    ("demo -t 0", "--threads must be at least 1", 1),
    ("demo --top-p 1.5", "top_p", 1),
    ("demo --top-k -1", "top_k", 1),
    ("demo -p ''", "empty", 1),
    ("train-tokenizer -o {tmp}/t.json --vocab-size 0", "vocab_size 0 is too small", 1),
    ("train-tokenizer -o {tmp}/t.json --vocab-size x", "Invalid value for '--vocab-size'", 2),
    ("train-tokenizer -o {tmp}/t.json --data-dir {tmp}", "missing data file: ", 1),
    ("no-such-command", "No such command 'no-such-command'", 2),
]


@pytest.mark.parametrize("line, fragment, code", BAD_FLAGS, ids=[c[0].split(" -o")[0] for c in BAD_FLAGS])
def test_bad_flag_is_one_error_line(capsys, tmp_path, ckpt, onnx_model, line, fragment, code):
    import shlex

    (tmp_path / "p.txt").write_text("Once")
    before = snapshot(ckpt), snapshot(onnx_model)
    args = [a.format(ckpt=ckpt, model=onnx_model, tmp=tmp_path) for a in shlex.split(line)]
    r = cli(capsys, *args)
    one_error(r, fragment, code)
    assert (snapshot(ckpt), snapshot(onnx_model)) == before  # sources untouched
    for name in ("r", "o", "q", "b", "t.json"):  # nothing half-made at the output
        assert not (tmp_path / name).exists() or name == "b" and not any((tmp_path / name).iterdir())


# ----------------------------------------------------------------------------- output = source
def _paths_to_source(src: Path, tmp: Path) -> dict[str, Path]:
    (tmp / "y").mkdir(exist_ok=True)
    link = tmp / "link"
    if not link.exists():
        link.symlink_to(src, target_is_directory=True)
    return {"same": src, "dotdot": tmp / "y" / ".." / src.relative_to(tmp),
            "symlink": link, "inside": src / "sub", "parent": src.parent}


@pytest.mark.parametrize("how", ["same", "dotdot", "symlink", "inside", "parent"])
@pytest.mark.parametrize("force", [False, True])
def test_quantize_never_writes_over_its_source(capsys, model_copy, tmp_path, how, force):
    before = snapshot(model_copy)
    out = _paths_to_source(model_copy, tmp_path)[how]
    r = cli(capsys, "quantize", model_copy, "-o", out, "--scheme", "int8", *(["--force"] if force else []))
    fragment = {"same": "is the model folder itself", "dotdot": "is the model folder itself",
                "symlink": "is the model folder itself", "inside": "is inside the model folder",
                "parent": "would replace the model folder"}[how]
    one_error(r, fragment)
    assert snapshot(model_copy) == before
    verify_folder(model_copy)


@pytest.mark.parametrize("how", ["same", "dotdot", "symlink", "inside", "parent"])
@pytest.mark.parametrize("force", [False, True])
def test_export_never_writes_over_its_checkpoint(capsys, ckpt_copy, tmp_path, how, force):
    before = snapshot(ckpt_copy)
    out = _paths_to_source(ckpt_copy, tmp_path)[how]
    r = cli(capsys, "export", ckpt_copy, "-o", out, *(["--force"] if force else []))
    fragment = "would replace the checkpoint" if how == "parent" else "is inside the checkpoint"
    one_error(r, fragment)
    assert snapshot(ckpt_copy) == before


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_output_that_is_a_file_or_holds_something_else(capsys, ckpt, onnx_model, tmp_path, command):
    src, extra = (onnx_model, ["--scheme", "int8"]) if command == "quantize" else (ckpt, [])
    (tmp_path / "file").write_text("x")
    one_error(cli(capsys, command, src, "-o", tmp_path / "file", *extra), "exists and is not a folder")
    assert (tmp_path / "file").read_text() == "x"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    one_error(cli(capsys, command, src, "-o", tmp_path / "other", *extra), "use --force to replace it")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- untrusted folders
def _manifest_edit(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    result = edit(data)
    if isinstance(result, bytes):
        path.write_bytes(result)
    else:
        path.write_text(json.dumps(data if result is None else result))


def _file_entry(name):
    def edit(m):
        first = next(iter(m["files"].values()))
        m["files"][name] = dict(first)
    return edit


MANIFEST_DEFECTS = {
    "array": (lambda m: [m], "holds a JSON list, expected an object"),
    "number": (lambda m: 42, "holds a JSON int, expected an object"),
    "not-json": (lambda m: b"{\"files\": ", "is not valid JSON"),
    "not-utf8": (lambda m: b"{\"kind\": \"\xff\xfe\"}", "is not UTF-8"),
    "files-list": (lambda m: {**m, "files": ["model.onnx"]}, "'files' must be an object"),
    "no-bytes": (lambda m: {**m, "files": {k: {"sha256": v["sha256"]} for k, v in m["files"].items()}},
                 "needs a 'sha256' string and a 'bytes' count"),
    "bytes-string": (lambda m: {**m, "files": {k: {**v, "bytes": "12"} for k, v in m["files"].items()}},
                     "needs a 'sha256' string and a 'bytes' count"),
    "dotdot": (_file_entry("../../etc/passwd"), "outside the folder (refused)"),
    "absolute": (_file_entry("/etc/passwd"), "outside the folder (refused)"),
    "kind-number": (lambda m: {**m, "kind": 7}, "'kind' must be a string"),
}


@pytest.mark.parametrize("defect", list(MANIFEST_DEFECTS))
@pytest.mark.parametrize("command", ["run", "inspect", "quantize", "eval", "to-ort"])
def test_untrusted_manifest_is_refused(capsys, model_copy, tmp_path, defect, command):
    edit, fragment = MANIFEST_DEFECTS[defect]
    _manifest_edit(model_copy, edit)
    args = {"run": ["-p", "Once", "-n", "2"], "inspect": [], "quantize": ["-o", tmp_path / "q", "--scheme", "int8"],
            "eval": ["--max-batches", "1"], "to-ort": []}[command]
    r = cli(capsys, command, model_copy, *args)
    if command == "inspect":  # inspect prints what it could read, then the problem as the error
        r.out = ""
    one_error(r, fragment)
    assert not (tmp_path / "q").exists() and not (model_copy / "model.ort").exists()


@pytest.mark.parametrize("defect", ["dotdot", "absolute", "not-json", "array", "no-bytes"])
@pytest.mark.parametrize("command", ["generate", "export"])
def test_untrusted_checkpoint_manifest_is_refused(capsys, ckpt_copy, tmp_path, defect, command):
    edit, fragment = MANIFEST_DEFECTS[defect]
    _manifest_edit(ckpt_copy, edit)
    args = ["-p", "Once", "-n", "2"] if command == "generate" else ["-o", tmp_path / "o"]
    one_error(cli(capsys, command, ckpt_copy, *args), fragment)
    assert not (tmp_path / "o").exists()


def test_symlink_out_of_the_folder_is_refused(capsys, model_copy, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.move(model_copy / "generation_config.json", outside)
    (model_copy / "generation_config.json").symlink_to(outside)
    one_error(cli(capsys, "run", model_copy, "-p", "Once", "-n", "2"), "leads outside the folder (refused)")


@pytest.mark.parametrize("where", ["../w.data", "/ABS/w.data", "link.data"])
def test_external_data_outside_the_folder_is_refused(capsys, model_copy, tmp_path, where):
    """model.onnx whose weights point outside the folder (`..`, absolute, a symlink out), with a
    manifest that vouches for it: the runtime refuses in one line and reads nothing outside."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    kind = read_manifest(model_copy)["kind"]
    graph = onnx.load(str(model_copy / "model.onnx"))
    convert_model_to_external_data(graph, all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    onnx.save_model(graph, str(model_copy / "model.onnx"))  # writes model_copy/w.data
    outside = tmp_path / "w.data"
    shutil.move(model_copy / "w.data", outside)
    location = where.replace("/ABS", str(tmp_path))
    if where == "link.data":
        (model_copy / "link.data").symlink_to(outside)
    for t in graph.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    (model_copy / "model.onnx").write_bytes(graph.SerializeToString())
    (model_copy / "model.onnx.data").unlink(missing_ok=True)
    write_manifest(model_copy, kind)
    if where == "link.data":  # unlisted, so ORT's own check is what refuses it
        _manifest_edit(model_copy, lambda m: {**m, "files": {k: v for k, v in m["files"].items()
                                                             if k != "link.data"}})
    r = cli(capsys, "run", model_copy, "-p", "Once", "-n", "2")
    one_error(r, "onnxruntime cannot load")
    assert "escapes model directory" in r.err or "not allowed" in r.err, r.err


CONFIG_DEFECTS = {
    "string-for-int": (lambda c: {**c, "hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
    "bool-for-int": (lambda c: {**c, "num_hidden_layers": True}, "num_hidden_layers must be an integer"),
    "float-for-int": (lambda c: {**c, "vocab_size": 512.5}, "vocab_size must be an integer"),
    "null-for-int": (lambda c: {**c, "hidden_size": None}, "hidden_size must be an integer"),
    "string-for-float": (lambda c: {**c, "rope_theta": "1e4"}, "rope_theta must be a number"),
    "nan": (lambda c: {**c, "rms_norm_eps": float("nan")}, "rms_norm_eps must be a number"),
    "array": (lambda c: [c], "JSON list, expected an object"),
    "number": (lambda c: 3, "JSON int, expected an object"),
    "no-arch": (lambda c: {k: v for k, v in c.items() if k not in ("arch", "model_type")}, "model_type"),
    "bad-arch": (lambda c: {**c, "arch": "rwkv"}, "unknown architecture 'rwkv'"),
    "negative": (lambda c: {**c, "num_hidden_layers": -2}, "num_hidden_layers must be positive"),
    "huge": (lambda c: {**c, "hidden_size": 1 << 22, "kv_lora_rank": 8}, "config implies (512, 4194304)"),
}


def _config_edit(folder: Path, edit, kind: str) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(cfg)))
    write_manifest(folder, kind, {k: v for k, v in read_manifest(folder).items()
                                  if k not in ("format", "kind", "files")})


@pytest.mark.parametrize("defect", list(CONFIG_DEFECTS))
@pytest.mark.parametrize("command", ["generate", "export", "info"])
def test_bad_checkpoint_config(capsys, ckpt_copy, tmp_path, defect, command):
    edit, fragment = CONFIG_DEFECTS[defect]
    if command == "info" and defect == "huge":
        pytest.skip("info only counts: a huge config is a valid question")
    _config_edit(ckpt_copy, edit, "checkpoint")
    args = {"generate": [ckpt_copy, "-p", "Once", "-n", "2"], "export": [ckpt_copy, "-o", tmp_path / "o"],
            "info": ["--config", ckpt_copy]}[command]
    one_error(cli(capsys, command, *args), fragment)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("defect", ["string-for-int", "array", "no-arch", "nan"])
def test_bad_model_folder_config(capsys, model_copy, defect):
    edit, fragment = CONFIG_DEFECTS[defect]
    _config_edit(model_copy, edit, read_manifest(model_copy)["kind"])
    one_error(cli(capsys, "run", model_copy, "-p", "Once", "-n", "2"), fragment)


def test_config_that_disagrees_with_the_graph_fails_before_any_output(capsys, model_copy):
    _config_edit(model_copy, lambda c: {**c, "num_hidden_layers": 1}, read_manifest(model_copy)["kind"])
    one_error(cli(capsys, "run", model_copy, "-p", "Once upon", "-n", "2"), "config.json and graph disagree")


def test_sharded_index_pointing_outside_is_refused(capsys, ckpt_copy, tmp_path):
    weights = ckpt_copy / "model.safetensors"
    shutil.move(weights, tmp_path / "stolen.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "stolen.safetensors", "pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": {n: "../stolen.safetensors" for n in names}}
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    write_manifest(ckpt_copy, "checkpoint")
    one_error(cli(capsys, "generate", ckpt_copy, "-p", "Once", "-n", "2"), "outside the folder (refused)")


@pytest.mark.parametrize("defect, fragment", [
    ("shape", "tensor model.embed_tokens.weight has shape (9999, 64), config implies (512, 64)"),
    ("extra-tensor", "unexpected ['evil']"),
    ("offsets", "cannot read weights model.safetensors: Error while deserializing header"),
    ("header-size", "cannot read weights model.safetensors"),
])
def test_bad_safetensors_is_refused_before_loading(capsys, ckpt_copy, defect, fragment):
    """Names and shapes come from the header and are checked before a weight is read."""
    import torch
    from safetensors.torch import load_file, save_file

    path = ckpt_copy / "model.safetensors"
    if defect in ("shape", "extra-tensor"):
        state = load_file(path)
        if defect == "shape":
            state["model.embed_tokens.weight"] = torch.zeros(9999, 64)
        else:
            state["evil"] = torch.zeros(3)
        save_file(state, path)
    else:
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        if defect == "offsets":  # a tensor said to end a terabyte into the file
            header = raw[8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[1099511627776,', 1)
            assert header != raw[8:8 + n]
            raw = raw[:8] + header + raw[8 + n:]
        else:  # a header length of 2**60 bytes
            raw = (1 << 60).to_bytes(8, "little") + raw[8:]
        path.write_bytes(raw)
    write_manifest(ckpt_copy, "checkpoint")
    one_error(cli(capsys, "generate", ckpt_copy, "-p", "Once", "-n", "2"), fragment)


@pytest.mark.parametrize("command", ["inspect", "quantize", "run"])
def test_truncated_graph(capsys, model_copy, tmp_path, command):
    graph = model_copy / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    args = {"inspect": [], "quantize": ["-o", tmp_path / "q", "--scheme", "int8"], "run": ["-p", "Once"]}[command]
    r = cli(capsys, command, model_copy, *args)
    if command == "inspect":
        r.out = ""
    one_error(r, "truncated or replaced")
    # with --no-verify the runtime still answers in one line
    if command == "run":
        write_manifest(model_copy, read_manifest(model_copy)["kind"])
        one_error(cli(capsys, "run", model_copy, "-p", "Once", "--no-verify"), "onnxruntime cannot load")


# ----------------------------------------------------------------------------- train and run folders
def test_train_into_an_existing_run_refuses(capsys, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "log.jsonl").write_text('{"step": 1}\n')
    before = snapshot(run)
    one_error(cli(capsys, "train", "--steps", "1", "-o", run), "already holds a run")
    assert snapshot(run) == before
    (tmp_path / "file").write_text("x")
    one_error(cli(capsys, "train", "--steps", "1", "-o", tmp_path / "file"), "exists and is not a folder")


def test_resume_past_the_end_refuses(capsys, tmp_path, tiny_tokenizer):
    """A finished run resumed with the same --steps: nothing to do is an error, not a silent no-op."""
    common = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1",
              "--max-chars", "20000", "--tokenizer", tiny_tokenizer, "-o", tmp_path / "run"]
    r = cli(capsys, "train", *common)
    assert r.code == 0, r.err
    before = snapshot(tmp_path / "run")
    one_error(cli(capsys, "train", *common, "--resume"), "is already at step 2")
    assert snapshot(tmp_path / "run") == before
    r = cli(capsys, "train", *common[:-2], "-o", tmp_path / "run", "--force")  # --force starts over
    assert r.code == 0, r.err
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xfe\x00bad", "not valid UTF-8"),
    (b"", "empty prompt"),
])
def test_prompt_file_contents(capsys, onnx_model, tmp_path, content, fragment):
    (tmp_path / "p.txt").write_bytes(content)
    one_error(cli(capsys, "run", onnx_model, "-f", tmp_path / "p.txt", "-n", "2"), fragment)


def test_prompt_longer_than_the_context(capsys, onnx_model, tmp_path):
    (tmp_path / "p.txt").write_text("word " * 5000)
    one_error(cli(capsys, "run", onnx_model, "-f", tmp_path / "p.txt", "-n", "2"), "the model's context is")
    r = cli(capsys, "run", onnx_model, "-f", tmp_path / "p.txt", "-n", "2", "--truncate", "left", "--no-echo")
    assert r.code == 0, r.err


# ----------------------------------------------------------------------------- token caches
def test_truncated_token_cache_is_rebuilt_not_used(capsys, ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSEUS_CACHE", str(tmp_path / "tokens"))
    args = ["eval", ckpt, "--max-batches", "1", "--seq-len", "32", "--batch-size", "2", "--json"]
    first = cli(capsys, *args)
    assert first.code == 0, first.err
    (cache,) = (tmp_path / "tokens").glob("valid.*.u16.bin")
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 3])
    again = cli(capsys, *args)
    assert again.code == 0 and "token cache" in again.err and "damaged" in again.err
    assert json.loads(again.out) == json.loads(first.out)
    cache.write_bytes(b"garbage")
    assert json.loads(cli(capsys, *args).out) == json.loads(first.out)


def test_token_cache_is_keyed_by_the_source_file(capsys, ckpt, tmp_path, data_dir, monkeypatch):
    """Another corpus with the same split name never reads the first one's cached ids."""
    import lzma

    monkeypatch.setenv("PERSEUS_CACHE", str(tmp_path / "tokens"))
    other = tmp_path / "other"
    other.mkdir()
    text = lzma.open(data_dir / "test.txt.xz", "rt", encoding="utf-8").read(50_000)
    with lzma.open(other / "valid.txt.xz", "wt", encoding="utf-8") as f:
        f.write(text)
    args = ["eval", ckpt, "--max-batches", "1", "--seq-len", "32", "--batch-size", "2", "--json"]
    a = json.loads(cli(capsys, *args).out)
    b = json.loads(cli(capsys, *args, "--data-dir", other).out)
    assert a["loss"] != b["loss"]
    assert len(list((tmp_path / "tokens").glob("valid.*.u16.bin"))) == 2


@pytest.mark.parametrize("action, fragment", [("enospc", "No space left on device"),
                                              ("erofs", "Read-only file system"), ("eio", "Input/output error")])
def test_token_cache_write_failure(capsys, ckpt, tmp_path, monkeypatch, action, fragment):
    monkeypatch.setenv("PERSEUS_CACHE", str(tmp_path / "tokens"))
    monkeypatch.setenv("PERSEUS_FAULT", f"tokens.write:{action}")
    r = cli(capsys, "eval", ckpt, "--max-batches", "1", "--seq-len", "32")
    one_error(r, f"cannot write token cache {tmp_path / 'tokens'}")
    assert fragment in r.err
    assert list((tmp_path / "tokens").iterdir()) == []  # no partial file, no temp file


# ----------------------------------------------------------------------------- faults inside writes
QUANTIZE = ["--scheme", "int8"]


@pytest.mark.parametrize("point", ["folder.written", "folder.swap", "file.replace/manifest.json"])
@pytest.mark.parametrize("action, fragment", [("enospc", "No space left on device"),
                                              ("erofs", "Read-only file system")])
def test_quantize_write_failure_keeps_the_old_output(capsys, onnx_model, tmp_path, monkeypatch, point, action,
                                                     fragment):
    out = tmp_path / "q"
    shutil.copytree(onnx_model, out)  # something valid already at the output
    before = snapshot(out)
    monkeypatch.setenv("PERSEUS_FAULT", f"{point}:{action}")
    r = cli(capsys, "quantize", onnx_model, "-o", out, *QUANTIZE, "--force")
    one_error(r, f"cannot write {out}")
    assert fragment in r.err
    assert snapshot(out) == before and hidden(tmp_path) == []


@pytest.mark.parametrize("action", ["enospc", "eio"])
def test_export_write_failure_leaves_nothing(capsys, ckpt, tmp_path, monkeypatch, action):
    monkeypatch.setenv("PERSEUS_FAULT", f"folder.written:{action}")
    one_error(cli(capsys, "export", ckpt, "-o", tmp_path / "o"), f"cannot write {tmp_path / 'o'}")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_write_failure_during_train(capsys, tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("PERSEUS_FAULT", "folder.written:enospc")
    r = cli(capsys, "train", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
            "--max-chars", "20000", "--tokenizer", tiny_tokenizer, "-o", tmp_path / "run")
    one_error(r, "No space left on device")
    assert not (tmp_path / "run" / "checkpoint").exists() and hidden(tmp_path / "run") == []


@pytest.mark.parametrize("point", ["folder.written", "folder.swap", "folder.replaced"])
def test_killed_quantize_force_never_leaves_the_path_without_a_model(capsys, onnx_model, tmp_path, point):
    """SIGKILL at each step of a --force replace; the next run recovers and cleans up."""
    out = tmp_path / "q"
    shutil.copytree(onnx_model, out)
    before = snapshot(out)
    r = sub("quantize", onnx_model, "-o", out, *QUANTIZE, "--force", env={"PERSEUS_FAULT": f"{point}:kill"})
    assert r.code == -9, r.err
    if point == "folder.swap":  # killed between the two renames: the old folder waits beside
        assert not out.exists() and any(n.startswith(".q.old-") for n in hidden(tmp_path))
        with pytest.raises(Exception, match="interrupted replace left the previous folder"):
            read_manifest(out)
    else:
        assert verify_folder(out)
        if point == "folder.written":
            assert snapshot(out) == before
    r = cli(capsys, "quantize", onnx_model, "-o", out, *QUANTIZE, "--force")
    assert r.code == 0, r.err
    if point == "folder.swap":
        assert f"note: restored {out}" in r.err
    assert read_manifest(out)["kind"] == "onnx-int8" and verify_folder(out)
    assert hidden(tmp_path) == []  # no .tmp-, .old- or .lock left


def test_ctrl_c_between_the_renames_puts_the_old_folder_back(onnx_model, tmp_path):
    out = tmp_path / "q"
    shutil.copytree(onnx_model, out)
    before = snapshot(out)
    r = sub("quantize", onnx_model, "-o", out, *QUANTIZE, "--force", env={"PERSEUS_FAULT": "folder.swap:int"})
    assert r.code == 130 and "Traceback" not in r.err, r.err
    assert snapshot(out) == before and hidden(tmp_path) == []


def test_killed_export_is_cleaned_by_the_next_run(capsys, ckpt, tmp_path):
    out = tmp_path / "o"
    r = sub("export", ckpt, "-o", out, env={"PERSEUS_FAULT": "folder.written:kill"})
    assert r.code == -9
    assert not out.exists() and any(n.startswith(".o.tmp-") for n in hidden(tmp_path))
    r = cli(capsys, "export", ckpt, "-o", out)
    assert r.code == 0, r.err
    assert verify_folder(out) and hidden(tmp_path) == []


def test_concurrent_writer_is_told_and_changes_nothing(capsys, onnx_model, tmp_path):
    out = tmp_path / "q"
    with writer_lock(out.absolute()):
        r = cli(capsys, "quantize", onnx_model, "-o", out, *QUANTIZE)
    one_error(r, "is being written by another perseus process")
    assert not out.exists()


def test_two_quantize_runs_racing_exactly_one_wins(onnx_model, tmp_path):
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "perseus_edge.cli", "quantize", str(onnx_model), "-o", str(out), *QUANTIZE]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [Result(p.wait(timeout=240), p.stdout.read(), p.stderr.read()) for p in procs]
    winners = [r for r in results if r.code == 0]
    losers = [r for r in results if r.code != 0]
    assert len(winners) == 1 and len(losers) == 1, [(r.code, r.err) for r in results]
    loser = losers[0]
    assert "Traceback" not in loser.err and loser.code == 1
    assert "being written by another perseus process" in loser.err or "already exists" in loser.err
    assert verify_folder(out) and hidden(tmp_path) == []


# ----------------------------------------------------------------------------- to-ort
@pytest.mark.parametrize("point", ["ort.unlisted", "ort.replaced", "file.replace/manifest.json"])
def test_killed_to_ort_leaves_a_loadable_folder(capsys, model_copy, point):
    """to-ort run twice (the second replaces the first's .ort) and killed at each step."""
    from perseus_edge.modelfile.reader import open_folder

    assert cli(capsys, "to-ort", model_copy).code == 0
    r = sub("to-ort", model_copy, env={"PERSEUS_FAULT": f"{point}:kill"})
    assert r.code == -9
    folder = open_folder(model_copy, format="onnx")  # the graph itself always verifies
    assert folder.graph.name == "model.onnx"
    files = read_manifest(model_copy)["files"]
    if "model.ort" in files:  # listed only when it is the one on disk
        open_folder(model_copy, format="ort")
    r = cli(capsys, "to-ort", model_copy)  # the next run cleans up and completes
    assert r.code == 0, r.err
    open_folder(model_copy, format="ort")
    assert hidden(model_copy) == [] and hidden(model_copy.parent) == []
    assert set(read_manifest(model_copy)["files"]) == {p.name for p in model_copy.iterdir() if p.is_file()} - {
        "manifest.json"}


def test_ctrl_c_while_to_ort_rewrites_the_manifest(model_copy):
    r = sub("to-ort", model_copy, env={"PERSEUS_FAULT": "file.replace/manifest.json:int"})
    assert r.code == 130 and "Traceback" not in r.err, r.err
    verify_folder(model_copy)  # never empty, never half-written
    assert hidden(model_copy) == []


@pytest.mark.parametrize("action", ["enospc", "erofs"])
def test_to_ort_write_failure(capsys, model_copy, monkeypatch, action):
    before = snapshot(model_copy)
    monkeypatch.setenv("PERSEUS_FAULT", f"ort.unlisted:{action}")
    one_error(cli(capsys, "to-ort", model_copy), "cannot write the .ort files")
    verify_folder(model_copy)
    assert {k: v for k, v in snapshot(model_copy).items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}


# ----------------------------------------------------------------------------- train interrupted
def test_ctrl_c_during_training_saves_a_resumable_checkpoint(capsys, tmp_path, tiny_tokenizer):
    common = ["--batch-size", "2", "--seq-len", "16", "--eval-every", "100", "--eval-batches", "1",
              "--max-chars", "20000", "--tokenizer", str(tiny_tokenizer), "-o", str(tmp_path / "run")]
    r = sub("train", "--steps", "50", *common, env={"PERSEUS_FAULT": "train.step@3:int"})
    assert r.code == 130 and "Traceback" not in r.err, r.err
    assert "checkpoint of step 3 saved" in r.err
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3
    r = cli(capsys, "train", "--steps", "5", *common, "--resume")
    assert r.code == 0, r.err
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 5


def test_broken_pipe_is_quiet(onnx_model):
    proc = subprocess.Popen([sys.executable, "-m", "perseus_edge.cli", "run", str(onnx_model), "-p", "Once",
                             "-n", "200", "--ignore-eos"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(3)
    proc.stdout.close()  # the reader goes away (`| head -c 3`)
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_real_sigint_in_interactive_mode(onnx_model):
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "perseus_edge.cli", "run", str(onnx_model), "-i"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    banner = proc.stderr.readline()
    assert "interactive mode" in banner, banner
    time.sleep(0.5)  # inside input()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err


# ----------------------------------------------------------------------------- unreadable models
@pytest.mark.parametrize("command", ["bench", "demo"])
def test_unreadable_model_is_one_error_line(capsys, model_copy, ckpt_copy, command):
    if command == "bench":  # a truncated graph
        onnx_file = model_copy / "model.onnx"
        onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
        r = cli(capsys, "bench", "-m", model_copy, "-p", "8", "-n", "0", "-r", "1", "-t", "1")
        fragment = "onnxruntime cannot load"
    else:  # a checkpoint whose config is not JSON: demo's build checks it against the manifest
        (ckpt_copy / "config.json").write_text("{not json")
        r = cli(capsys, "demo", "--checkpoint", ckpt_copy, "-n", "4")
        assert r.err.startswith("first run: building ")  # the one progress line, then the error
        r.err = r.err.split("\n", 1)[1]
        fragment = "config.json is 9 bytes, manifest says"
    one_error(r, fragment)
