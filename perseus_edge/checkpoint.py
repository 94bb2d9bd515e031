"""Checkpoint folders: config.json + safetensors weights + tokenizer.json + manifest.json.

The folder is also a valid Hugging Face DeepseekV3 checkpoint for the MLA architectures: the
config carries HF's keys (`model_type`, `architectures`, ...) beside ours, and tensor names are
HF's, sharded with `model.safetensors.index.json` when asked. No pickle anywhere: weights are
safetensors, everything else JSON. Writes are atomic and loads verify every sha256.

The other way round, a transformers DeepSeek-V2/V3 folder (`save_pretrained`, no manifest, no
`arch`) loads too: its config is translated or refused by `perseus_edge.model.hf`, and
`_fit_state` reconciles its tensors with our modules.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from perseus_edge.errors import PerseusError
from perseus_edge.manifest import MANIFEST, atomic_folder, safe_member, verify_folder, write_manifest
from perseus_edge.model.config import ModelConfig
from perseus_edge.model.hf import is_transformers_folder
from perseus_edge.model.transformer import PerseusLM
from perseus_edge.modelfile import CONFIG, TOKENIZER

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def save_checkpoint(folder: Path, model: PerseusLM, tokenizer_json: Path | str, dtype: str = "fp32",
                    max_shard_bytes: int | None = None, force: bool = True, meta: dict | None = None,
                    extra_files: dict[str, Path] | None = None) -> Path:
    """Write `model` as a checkpoint folder; `max_shard_bytes` splits weights into HF-style shards."""
    if dtype not in DTYPES:
        raise PerseusError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    folder = Path(folder)
    with atomic_folder(folder, force=force) as tmp:
        model.cfg.save(tmp / CONFIG)
        _save_weights(tmp, state, max_shard_bytes)
        shutil.copyfile(tokenizer_json, tmp / TOKENIZER)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        write_manifest(tmp, "checkpoint", {"dtype": dtype, **(meta or {})})
    return folder


def _save_weights(folder: Path, state: dict, max_shard_bytes: int | None) -> None:
    fmt = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in state.values())
    if not max_shard_bytes or total <= max_shard_bytes:
        save_file(state, folder / WEIGHTS, metadata=fmt)
        return
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata=fmt)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint; names from the index must stay inside the folder."""
    folder = Path(folder)
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if not (folder / INDEX).is_file():
        raise PerseusError(f"{folder} has no {WEIGHTS} or {INDEX}")
    try:
        index = json.loads((folder / INDEX).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PerseusError(f"{folder / INDEX} is not a readable JSON index ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise PerseusError(f"{folder / INDEX} has no 'weight_map' object")
    return sorted({safe_member(folder, f, INDEX) for f in weight_map.values()})


def header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers only (nothing is allocated)."""
    shapes = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    shapes[k] = tuple(st.get_slice(k).get_shape())
        except (SafetensorError, OSError) as e:
            raise PerseusError(f"cannot read weights {f.name}: {_reason(e)}") from None
    return shapes


def _reason(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in weight_files(folder):
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise PerseusError(f"cannot read weights {f.name}: {_reason(e)}") from None
    return state


def has_manifest(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def tokenizer_path(folder: Path, tokenizer: Path | str | None = None) -> Path:
    """The tokenizer to use: `tokenizer` when given, else the folder's tokenizer.json."""
    if tokenizer is not None:
        if not Path(tokenizer).is_file():
            raise PerseusError(f"tokenizer file not found: {tokenizer}")
        return Path(tokenizer)
    path = Path(folder) / TOKENIZER
    if not path.is_file():
        raise PerseusError(f"{folder} has no {TOKENIZER}: give one with --tokenizer FILE")
    return path


def load_checkpoint(folder: Path, device: str = "cpu", dtype: str | None = None,
                    verify: bool = True, tokenizer: Path | str | None = None) -> tuple[PerseusLM, Path]:
    """Verify, then rebuild the model; returns (model in eval mode, path of tokenizer.json).

    A folder with manifest.json is verified against it (kind checkpoint). A transformers
    DeepSeek-V2/V3 folder (`save_pretrained`) needs none: it is read as it is, and `tokenizer`
    names a tokenizer.json when the folder has none.
    """
    from perseus_edge.tokenizer import check_vocab, load_tokenizer

    folder = Path(folder)
    if verify and (has_manifest(folder) or not is_transformers_folder(folder)):
        verify_folder(folder, "checkpoint")  # perseus checkpoints always carry a manifest
    cfg = ModelConfig.load(folder)
    tok_path = tokenizer_path(folder, tokenizer)
    check_vocab(load_tokenizer(tok_path), cfg.vocab_size, str(folder), name=tok_path.name)
    check_shapes_before_loading(cfg, folder)
    model = PerseusLM(cfg)
    state = _fit_state(cfg, load_state(folder))
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    if missing or unexpected:
        raise PerseusError(f"{folder}: weights do not match the config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in state.items():
        if v.shape != ours[k].shape:
            raise PerseusError(f"{folder}: tensor {k} has shape {tuple(v.shape)}, config implies {tuple(ours[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    if dtype:
        model.to(DTYPES[dtype])
    return model.to(device).eval(), tok_path


def _fit_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What transformers' DeepSeek folders hold beyond (or short of) our modules, reconciled
    exactly: a tied head, multi-token-prediction layers (not part of the forward pass), empty
    shared experts (n_shared_experts 0), and DeepSeek-V2's router without a selection bias."""
    bad = sorted(k for k, v in state.items() if v.dtype not in DTYPES.values())
    if bad:
        raise PerseusError(f"tensor {bad[0]} is {state[bad[0]].dtype}: only fp32, bf16 and fp16 "
                           "weights are supported")
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    mtp = int(cfg.extra.get("num_nextn_predict_layers") or cfg.extra.get("num_mtp_layers") or 0)
    extra_layers = {f"model.layers.{cfg.num_hidden_layers + i}." for i in range(mtp)}
    state = {k: v for k, v in state.items()
             if not (k.startswith(tuple(extra_layers)) if extra_layers else False)
             and not (".shared_experts." in k and cfg.n_shared_experts == 0 and v.numel() == 0)}
    if cfg.scoring_func == "softmax":  # V2 has no bias: ours stays at zero, selection unchanged
        for i in range(cfg.num_hidden_layers):
            if cfg.layer_is_moe(i):
                state.setdefault(f"model.layers.{i}.mlp.gate.e_score_correction_bias",
                                 torch.zeros(cfg.n_routed_experts))
    return state


def random_checkpoint(folder: Path, cfg: ModelConfig, tokenizer_json: Path | str, seed: int = 0,
                      **save_options) -> Path:
    """A checkpoint of `cfg` with random weights, router biases perturbed as after training (so
    routing is not uniform): what tests and measurements use where no trained model is needed."""
    torch.manual_seed(seed)
    model = PerseusLM(cfg)
    for router in model.routers():
        router.e_score_correction_bias.normal_(0, 0.05)
    return save_checkpoint(folder, model, tokenizer_json, **save_options)


def check_shapes_before_loading(cfg: ModelConfig, folder: Path) -> None:
    """Shapes from the safetensors headers against the config (built on the meta device), and
    the model's size against free memory, before any allocation: a bogus config or a doctored
    header is one error line, not a giant malloc."""
    import psutil

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in PerseusLM(cfg).state_dict().items()}
    for k, shape in header_shapes(weight_files(folder)).items():
        if k in expected and shape != expected[k]:
            raise PerseusError(f"{folder}: tensor {k} has shape {shape}, config implies {expected[k]}")
    need = cfg.param_counts()["total"] * 8  # fp32 weights + the file's copy while loading
    avail = psutil.virtual_memory().available
    if need > avail:
        raise PerseusError(f"{folder}: the model needs about {need / 2**30:.1f} GiB to load, "
                           f"more than the {avail / 2**30:.1f} GiB available")
