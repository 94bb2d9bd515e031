"""Core CLI commands: info, train-tokenizer, train, eval, generate.

torch is imported inside the commands that need it, so `perseus --help`, `perseus info` and
`perseus eval` on an ONNX folder work on a torch-free install.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from perseus_edge.errors import PerseusError
from perseus_edge.train_config import TrainConfig  # the defaults of `perseus train`

console = Console()
MAX_TEXT_BYTES = 256 << 20  # eval --text is read whole; the corpus splits are streamed


def info(
    preset: str = typer.Option("54m", help="Preset: tiny, 17m, 54m, 202m."),
    arch: Optional[str] = typer.Option(None, help="moe-mla-rope, mla-dense, mha, mha-moe (default: all)."),
    config: Optional[Path] = typer.Option(None, help="A config.json (checkpoint or model folder) instead of a preset."),
    context: int = typer.Option(1024, help="Context length for FLOPs and full-context cache size."),
) -> None:
    """Parameters (total/active), KV-cache bytes per token and FLOPs per token of a config."""
    from perseus_edge.model.config import ARCHS, ModelConfig
    from perseus_edge.model.config import preset as make_preset

    if context < 1:
        raise PerseusError(f"--context must be at least 1, got {context}")
    if config is not None:
        cfgs = [(str(config), ModelConfig.load(config))]
    else:
        cfgs = [(f"{preset}/{a}", make_preset(preset, a)) for a in ([arch] if arch else ARCHS)]
    table = Table(title=f"model sizes (context {context})")
    for col in ("model", "params", "active", "KV B/token fp16", "KV MiB @ctx fp16", "GFLOPs/token"):
        table.add_column(col, justify="right")
    for name, c in cfgs:
        p = c.param_counts()
        kv = c.kv_bytes_per_token(2)
        table.add_row(name, f"{p['total'] / 1e6:.2f}M", f"{p['active'] / 1e6:.2f}M", f"{kv:,}",
                      f"{kv * context / 2**20:.1f}", f"{c.flops_per_token(context) / 1e9:.3f}")
    console.print(table)


def train_tokenizer(
    out: Path = typer.Option(..., "-o", "--out", help="Where to write tokenizer.json."),
    vocab_size: int = typer.Option(8192, help="Vocabulary size (special tokens included)."),
    data_dir: Optional[Path] = typer.Option(None, help="Corpus folder (default: $PERSEUS_DATA_DIR or ../shared/data/gutenberg)."),
) -> None:
    """Train the byte-level BPE tokenizer on the train split."""
    from perseus_edge.data import resolve_data_dir, split_file
    from perseus_edge.tokenizer import train_tokenizer as train_bpe

    if out.is_dir():
        raise PerseusError(f"{out} is a folder: -o names the tokenizer file to write (e.g. {out / 'tokenizer.json'})")
    if vocab_size > 65536:
        raise PerseusError(f"--vocab-size {vocab_size} is too large: token files hold uint16 ids (at most 65536)")
    src = split_file(resolve_data_dir(data_dir), "train")
    tok = train_bpe([src], vocab_size=vocab_size, out_path=out)
    console.print(f"wrote {out} ({tok.get_vocab_size()} tokens)")


def train(
    preset: str = typer.Option(TrainConfig.preset, help="Model size: tiny, 17m, 54m, 202m."),
    arch: str = typer.Option(TrainConfig.arch, help="moe-mla-rope, mla-dense, mha, mha-moe."),
    optimizer: str = typer.Option(TrainConfig.optimizer, help="muon (hidden matrices) + AdamW (rest), or adamw for all."),
    lr: float = typer.Option(TrainConfig.lr, help="Peak lr of the hidden matrices."),
    adam_lr: float = typer.Option(TrainConfig.adam_lr, help="Peak lr of embeddings, head, norms and router."),
    weight_decay: float = typer.Option(TrainConfig.weight_decay),
    batch_size: int = typer.Option(TrainConfig.batch_size, help="Sequences per process per step."),
    seq_len: int = typer.Option(TrainConfig.seq_len),
    steps: int = typer.Option(TrainConfig.steps),
    warmup: int = typer.Option(TrainConfig.warmup),
    eval_every: int = typer.Option(TrainConfig.eval_every),
    eval_batches: int = typer.Option(TrainConfig.eval_batches),
    patience: int = typer.Option(TrainConfig.patience, help="Stop after this many evaluations without a new best "
                                 "valid loss; OUT/best holds the best weights (0: train every step, no best/)."),
    seed: int = typer.Option(TrainConfig.seed),
    compile: bool = typer.Option(TrainConfig.compile, help="torch.compile the decoder layers."),
    router_bias_rate: Optional[float] = typer.Option(
        TrainConfig.router_bias_rate, help="MoE router bias update per step (default: the preset's 1e-3, DeepSeek-V3's value)."),
    max_chars: Optional[int] = typer.Option(TrainConfig.max_chars, help="Only tokenize this many characters of train (smoke runs)."),
    data_dir: Optional[str] = typer.Option(TrainConfig.data_dir),
    tokenizer: Optional[str] = typer.Option(TrainConfig.tokenizer, help="tokenizer.json (default: the shipped 8192-token one)."),
    out: str = typer.Option(TrainConfig.out, "-o", "--out", help="Run folder: log.jsonl and checkpoint/."),
    resume: bool = typer.Option(TrainConfig.resume, help="Continue from OUT/checkpoint."),
    force: bool = typer.Option(TrainConfig.force, "--force", help="Start over in a run folder that already holds a run."),
) -> None:
    """Train a model of the family (under torchrun for several processes)."""
    from perseus_edge.train import train as run

    cfg = TrainConfig(preset=preset, arch=arch, optimizer=optimizer, lr=lr, adam_lr=adam_lr,
                      weight_decay=weight_decay, batch_size=batch_size, seq_len=seq_len, steps=steps,
                      warmup=min(warmup, steps) if steps > 0 else warmup, eval_every=eval_every, eval_batches=eval_batches, patience=patience, seed=seed,
                      compile=compile, router_bias_rate=router_bias_rate, max_chars=max_chars,
                      data_dir=data_dir, tokenizer=tokenizer, out=out, resume=resume, force=force)
    result = run(cfg)
    if result.get("final_loss") is not None:
        console.print(f"done: train loss {result['final_loss']:.4f}, valid loss {result['val_loss']:.4f}, "
                      f"checkpoint {out}/checkpoint")
        if result.get("best") is not None:
            best = result["best"]
            console.print(f"best valid loss {best['val_loss']:.4f} at step {best['step']}: {out}/best")


def evaluate(
    model_dir: Path = typer.Argument(..., help="Checkpoint folder (perseus or transformers DeepSeek-V2/V3) "
                                               "or exported ONNX model folder."),
    split: str = typer.Option("valid", help="valid or test (never tune on test)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Evaluate on this UTF-8 text file instead of a split."),
    seq_len: int = typer.Option(256),
    max_batches: Optional[int] = typer.Option(None, help="Limit the number of windows (default: whole split)."),
    batch_size: int = typer.Option(8),
    threads: Optional[int] = typer.Option(None, help="CPU threads (ONNX folders)."),
    data_dir: Optional[Path] = typer.Option(None),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer",
                                             help="tokenizer.json for a checkpoint folder that has none."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Loss and perplexity on a held-out split or a text file (the same windows): PyTorch for
    checkpoints, ONNX Runtime for model folders."""
    from perseus_edge.manifest import read_manifest
    from perseus_edge.model.hf import is_transformers_folder
    from perseus_edge.tokenizer import load_tokenizer

    for name, value in (("seq-len", seq_len), ("batch-size", batch_size), ("max-batches", max_batches),
                        ("threads", threads)):
        if value is not None and value < 1:
            raise PerseusError(f"--{name} must be at least 1, got {value}")
    if split not in ("valid", "test", "train"):
        raise PerseusError(f"unknown split {split!r}: expected valid or test")
    if not (model_dir / "manifest.json").is_file() and is_transformers_folder(model_dir):
        kind = "checkpoint"
    else:
        kind = read_manifest(model_dir).get("kind")
    tok_path = tokenizer if tokenizer is not None and kind == "checkpoint" else model_dir / "tokenizer.json"
    if kind == "checkpoint" and tokenizer is None and not tok_path.is_file():
        raise PerseusError(f"{model_dir} has no tokenizer.json: give one with --tokenizer FILE")
    if kind != "checkpoint" and not str(kind).startswith("onnx"):
        raise PerseusError(f"{model_dir} holds a {kind!r} folder: expected a checkpoint or an ONNX model folder")
    tok = load_tokenizer(tok_path)
    check_memory(batch_size * seq_len * tok.get_vocab_size() * 16,
                 f"--batch-size {batch_size} x --seq-len {seq_len} x vocab {tok.get_vocab_size()}",
                 "lower --batch-size")
    tokens, source = _eval_tokens(tok, text, split, data_dir)
    if kind == "checkpoint":
        import math

        import torch

        from perseus_edge.checkpoint import load_checkpoint
        from perseus_edge.train import evaluate as eval_loss

        model, _ = load_checkpoint(model_dir, tokenizer=tokenizer)
        if seq_len > model.cfg.max_position_embeddings:
            raise PerseusError(f"seq_len {seq_len} exceeds the model context {model.cfg.max_position_embeddings}")
        if threads:
            torch.set_num_threads(threads)
        windows = (len(tokens) - 1) // seq_len  # eval_batches scores whole windows only
        if windows < 1:
            raise PerseusError(f"{source} has {len(tokens)} tokens: not one window of --seq-len {seq_len} + 1")
        loss = eval_loss(model, tokens, seq_len, batch_size, max_batches, torch.device("cpu"))
        if max_batches is not None:
            windows = min(windows, max_batches * batch_size)
        result = {"loss": loss, "ppl": math.exp(loss), "tokens": windows * seq_len}
    else:
        from perseus_edge.runtime.evaluate import evaluate as eval_onnx

        if (len(tokens) - 1) // seq_len < 1:
            raise PerseusError(f"{source} has {len(tokens)} tokens: not one window of --seq-len {seq_len} + 1")
        result = eval_onnx(model_dir, tokens, seq_len=seq_len, max_batches=max_batches, threads=threads,
                           batch_size=batch_size)
    result = {"model": str(model_dir), "split": source, "seq_len": seq_len, **result}
    if as_json:
        print(json.dumps(result))
    else:
        console.print(f"{source}: loss {result['loss']:.4f}  perplexity {result['ppl']:.3f}  ({result['tokens']:,} tokens)")


def _eval_tokens(tok, text: Optional[Path], split: str, data_dir: Optional[Path]):
    """(token ids, name of what they came from): a split of the corpus, or a UTF-8 text file."""
    import numpy as np

    from perseus_edge.data import resolve_data_dir, token_cache_dir, tokenize_split

    if text is None:
        return tokenize_split(tok, resolve_data_dir(data_dir), split, token_cache_dir(), progress=False), split
    if text.exists() and not text.is_file():  # a folder, /dev/zero, a pipe: not a text to score
        raise PerseusError(f"--text {text} is not a regular file")
    if text.is_file() and text.stat().st_size > MAX_TEXT_BYTES:
        raise PerseusError(f"--text {text} is larger than {MAX_TEXT_BYTES >> 20} MiB: "
                           f"use the corpus splits (--data-dir) for large evaluations")
    try:
        content = text.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PerseusError(f"text file not found: {text}") from None
    except UnicodeDecodeError as e:
        raise PerseusError(f"{text} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise PerseusError(f"cannot read {text}: {e.strerror}") from None
    return np.asarray(tok.encode(content, add_special_tokens=False).ids, dtype=np.int64), str(text)


def generate(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder (perseus or transformers DeepSeek-V2/V3)."),
    prompt: str = typer.Option(..., "-p", "--prompt"),
    n: int = typer.Option(64, "-n", "--max-new-tokens"),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_k: int = typer.Option(0),
    top_p: float = typer.Option(1.0),
    repeat_penalty: float = typer.Option(1.0),
    seed: Optional[int] = typer.Option(None),
    device: str = typer.Option("cpu"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer",
                                             help="tokenizer.json for a checkpoint folder that has none."),
) -> None:
    """Generate with the PyTorch reference (what the ONNX runtime is checked against)."""
    from perseus_edge.checkpoint import load_checkpoint
    from perseus_edge.reference import generate_tokens
    from perseus_edge.sampling import Sampler
    from perseus_edge.tokenizer import EOS, load_tokenizer

    if n <= 0:
        raise PerseusError(f"-n must be positive, got {n}")
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repeat_penalty, seed=seed)
    check_device(device)
    model, tok_path = load_checkpoint(checkpoint, device=device, tokenizer=tokenizer)
    tok = load_tokenizer(tok_path)
    ids = tok.encode(prompt).ids
    out = list(generate_tokens(model, ids, n, sampler, eos_id=tok.token_to_id(EOS)))
    sys.stdout.write(prompt + tok.decode(out, skip_special_tokens=False) + "\n")


def check_device(device: str) -> None:
    """A torch device this build and machine can use, else one error line (before any loading)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise PerseusError(f"unknown --device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but no GPU is visible"
            raise PerseusError(f"--device {device}: this torch ({torch.__version__}) is {build}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PerseusError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        raise PerseusError(f"--device {device!r} is not supported (use cpu or cuda)")


def check_memory(need: int, what: str, fix: str) -> None:
    """Refuse work whose arrays alone would exceed the memory this process may use."""
    import resource

    import psutil

    limit = psutil.virtual_memory().available
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft - psutil.Process().memory_info().vms)
    if need > limit:
        raise PerseusError(f"{what} needs about {need / 2**30:.1f} GiB, more than the "
                           f"{max(limit, 0) / 2**30:.1f} GiB this process may use: {fix}")


def register(app: typer.Typer) -> None:
    app.command()(info)
    app.command("train-tokenizer")(train_tokenizer)
    app.command()(train)
    app.command("eval")(evaluate)
    app.command()(generate)
