"""Read a model folder: `open_folder` for its small files, `load` for the whole `Program`.

    folder = open_folder("model/")     # manifest sha256s, config, generation config, tokenizer
    program = load("model/")           # ... and the graph with its weights (needs onnx)

`open_folder` is what the runtime uses: torch- and onnx-free. Every problem with the folder is a
one-line `PerseusError`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from perseus_edge.errors import PerseusError
from perseus_edge.manifest import read_manifest, verify_folder
from perseus_edge.model.config import ModelConfig
from perseus_edge.modelfile import names as mf
from perseus_edge.modelfile.program import Program
from perseus_edge.tokenizer import EOS, check_vocab, load_tokenizer

FORMATS = ("auto", "onnx", "ort")


@dataclass
class ModelFolder:
    """Everything in a model folder except the graph itself."""

    path: Path
    manifest: dict
    config: ModelConfig
    generation: dict  # generation_config.json ({} when absent)
    tokenizer: object  # tokenizers.Tokenizer
    graph: Path  # model.onnx or model.ort
    format: str  # "onnx" or "ort"

    @property
    def eos_ids(self) -> list[int]:
        """End-of-sequence ids: generation_config's eos_token_id, else the tokenizer's EOS."""
        eos = self.generation.get("eos_token_id")
        if eos is None:
            eos = self.tokenizer.token_to_id(EOS)
        ids = eos if isinstance(eos, list) else [eos]
        return [int(i) for i in ids if i is not None]


def open_folder(path: str | os.PathLike, format: str = "auto", verify: bool = True) -> ModelFolder:
    """Check a model folder and load its small files. `format`: auto (onnx if present), onnx, ort."""
    path = Path(path)
    if format not in FORMATS:
        raise PerseusError(f"unknown model format {format!r} (choose from {', '.join(FORMATS)})")
    manifest = read_manifest(path)  # clear errors for a missing folder / missing manifest
    kind = str(manifest.get("kind", ""))
    if kind == "checkpoint":
        raise PerseusError(f"{path} is a training checkpoint, not a model folder: "
                           f"run `perseus export {path} -o OUT` first")
    if not kind.startswith("onnx"):
        raise PerseusError(f"{path} holds a {kind!r} folder, expected an exported ONNX model folder")
    if verify:
        manifest = verify_folder(path)
    onnx_path, ort_path = path / mf.MODEL_ONNX, path / mf.MODEL_ORT
    if format == "auto":
        format = "onnx" if onnx_path.is_file() else "ort"
    graph = onnx_path if format == "onnx" else ort_path
    if not graph.is_file():
        hint = " (create it with `perseus to-ort`)" if format == "ort" else ""
        raise PerseusError(f"{path} has no {graph.name}{hint}")
    if verify and graph.name not in manifest.get("files", {}):
        raise PerseusError(f"{path}: {graph.name} is not listed in the manifest (unverified file)")
    config = ModelConfig.load(path / mf.CONFIG)
    generation = {}
    gpath = path / mf.GENERATION_CONFIG
    if gpath.is_file():
        try:
            generation = json.loads(gpath.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PerseusError(f"{gpath} is not valid JSON ({e})") from None
        if not isinstance(generation, dict):
            raise PerseusError(f"{gpath} holds a JSON {type(generation).__name__}, expected an object")
    tokenizer = load_tokenizer(path / mf.TOKENIZER)
    check_vocab(tokenizer, config.vocab_size, where=f"the model in {path}")
    return ModelFolder(path, manifest, config, generation, tokenizer, graph, format)


def load(path: str | os.PathLike, verify: bool = True) -> Program:
    """The whole model folder in memory (graph with its weights), to hand to a compiler stage."""
    import onnx

    folder = open_folder(path, format="onnx", verify=verify)
    try:
        graph = onnx.load(str(folder.graph))
    except Exception as e:  # noqa: BLE001 - onnx raises several types, all with a message
        raise PerseusError(f"cannot read {folder.graph}: {str(e).strip().splitlines()[0]}") from None
    records = {k: v for k, v in folder.manifest.items() if k not in ("format", "kind", "files")}
    return Program(graph, folder.config, (folder.path / mf.TOKENIZER).read_bytes(), folder.generation,
                   str(folder.manifest.get("kind")), records)
