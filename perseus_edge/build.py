"""The compiler's stages composed: checkpoint or model folder in, model folder out.

    export(checkpoint) -> Program -> quantize(program, scheme) -> lower(program, target) -> save(program, folder)

    export_checkpoint(ckpt, out, target)           `perseus export`: export, lower, save
    quantize_model(model_dir, out, scheme, ...)    `perseus quantize`: load, quantize, lower, save
    build(ckpt, scheme, target)                    the cached build (`perseus demo`, bench): the
                                                   folder for a checkpoint, made once per
                                                   checkpoint manifest sha256

Every folder written records its source checkpoint (the sha256 of its manifest, which lists the
sha256 of every file), so "reuse the build if the source is unchanged" is one test, `built_from`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from perseus_edge import modelfile as mf
from perseus_edge.atomic import same_or_inside
from perseus_edge.errors import PerseusError
from perseus_edge.manifest import MANIFEST, read_manifest, sha256_file, verify_folder


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, target: str = "portable",
                      max_context: int | None = None, force: bool = False,
                      tokenizer: str | os.PathLike | None = None) -> Path:
    """Export the checkpoint in `ckpt_dir` (perseus, or transformers DeepSeek-V2/V3) as a model
    folder for `target` at `out_dir`; returns it. `tokenizer` replaces (or supplies) its tokenizer.json.

    force: replace whatever `out_dir` holds. Without it, a non-empty `out_dir` is only replaced
    when it holds an earlier build of the same checkpoint.
    """
    from perseus_edge.export import export
    from perseus_edge.export.pipeline import checkpoint_sha
    from perseus_edge.lower import check_target, lower
    from perseus_edge.modelfile.writer import save

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    check_target(target)
    replace = _may_replace(ckpt_dir, out_dir, checkpoint_sha(ckpt_dir), force)
    return save(lower(export(ckpt_dir, max_context, tokenizer), target), out_dir, force=replace)


def quantize_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, scheme: str,
                   force: bool = False, **options) -> Path:
    """Quantize the fp32 export in `model_dir` into `out_dir`; returns `out_dir`.

    options: those of `perseus_edge.quantize.quantize`; `target` also picks the lowering that
    follows (default portable). The export is the portable one, or one lowered for that target.
    """
    from perseus_edge.lower import lower
    from perseus_edge.modelfile.reader import load
    from perseus_edge.modelfile.writer import save
    from perseus_edge.quantize import Plan, quantize

    src, out = Path(model_dir), Path(out_dir)
    Plan.make(scheme, **options)  # bad options fail before any work
    manifest = _check_quantize_source(src, options.get("target", "portable"))
    _check_output(src, out, force)
    program = quantize(load(src), scheme, **options)
    program.records[mf.QUANT_META]["source"] = {"path": str(src.absolute()), "kind": manifest.get("kind"),
                                                 "sha256": sha256_file(src / MANIFEST)}
    return save(lower(program, options.get("target", "portable")), out, force=force)


def build(checkpoint: str | os.PathLike, scheme: str | None = "int8", target: str = "ort-cpu",
          root: str | os.PathLike | None = None, log=print) -> Path:
    """The model folder of `checkpoint` quantized with `scheme` (None: fp32) for `target`, built
    once into `root` (default `$XDG_CACHE_HOME/perseus-edge/builds`) and reused while the
    checkpoint is unchanged."""
    import importlib.util

    from perseus_edge.export.pipeline import checkpoint_sha

    ckpt = Path(checkpoint)
    manifest = read_manifest(ckpt)
    if manifest.get("kind") != "checkpoint":
        raise PerseusError(f"{ckpt} is not a training checkpoint (its kind is {manifest.get('kind')!r})")
    sha = checkpoint_sha(ckpt)
    folder = Path(root or cache_root()) / sha[:16] / f"{target}-{scheme or 'fp32'}"
    if built_from(folder, sha):
        return folder
    missing = [m for m in ("torch", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise PerseusError(f"building {ckpt} needs {' and '.join(missing)} once (the result is cached): "
                           f"pip install 'perseus-edge[export]'")
    log(f"building {ckpt} ({target}, {scheme or 'fp32'}) once into {folder}")
    # In a child process: torch and the exporter's memory never enter the caller, which goes on to
    # run the model torch-free (the demo's first run used to report ~880 MiB peak RSS, build included).
    code = "import sys; from perseus_edge.build import _build_main; _build_main(sys.argv[1:])"
    child = subprocess.run([sys.executable, "-c", code, str(ckpt), scheme or "", target, str(folder)],
                           stderr=subprocess.PIPE, text=True)
    if child.returncode:
        lines = child.stderr.strip().splitlines()
        raise PerseusError(lines[-1].removeprefix("error: ") if lines else
                           f"building {ckpt} failed (exit status {child.returncode})")
    return folder


def _build_main(args: list[str]) -> None:
    """`build`'s child: export, quantize, lower, save; a PerseusError becomes its last stderr line."""
    from perseus_edge.export import export
    from perseus_edge.lower import lower
    from perseus_edge.modelfile.writer import save
    from perseus_edge.quantize import quantize

    ckpt, scheme, target, folder = args
    try:
        program = export(Path(ckpt))
        if scheme:
            program = quantize(program, scheme, target=target)
        save(lower(program, target), Path(folder), force=True)
    except PerseusError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "perseus-edge" / "builds"


def built_from(folder: Path, source_sha: str) -> bool:
    """Whether `folder` holds an intact model folder built from the checkpoint with manifest
    sha256 `source_sha`."""
    if not (folder / MANIFEST).is_file():
        return False
    try:
        manifest = verify_folder(folder)
    except PerseusError:
        return False
    source = (manifest.get(mf.EXPORT_META) or {}).get("source_checkpoint") or {}
    return source.get("sha256") == source_sha


# ----------------------------------------------------------------------------- folder checks
def _may_replace(ckpt_dir: Path, out_dir: Path, source_sha: str, force: bool) -> bool:
    """Whether `out_dir` may be replaced; raises when it must not be touched."""
    same, out_inside, src_inside = same_or_inside(out_dir, ckpt_dir)  # after `..` and symlinks
    if same or out_inside:
        raise PerseusError(f"the output folder {out_dir} is inside the checkpoint {ckpt_dir}")
    if src_inside:
        raise PerseusError(f"the output folder {out_dir} would replace the checkpoint {ckpt_dir}")
    out = out_dir.absolute()
    if not out.exists():
        return False
    if not out.is_dir():
        raise PerseusError(f"{out_dir} exists and is not a folder")
    if force or not any(out.iterdir()) or built_from(out, source_sha):
        return True  # forced, empty, or an earlier build of this same checkpoint
    try:
        manifest = read_manifest(out)
    except PerseusError:
        raise PerseusError(f"{out_dir} already exists and is not empty (use --force to replace it)") from None
    source = (manifest.get(mf.EXPORT_META) or {}).get("source_checkpoint") or {}
    what = (f"a model exported from {source['path']}" if source.get("path")
            else f"a {manifest.get('kind')!r} folder")
    raise PerseusError(f"{out_dir} already holds {what}, not an export of {ckpt_dir} "
                       f"(use --force to replace it)")


def _check_quantize_source(src: Path, wanted: str) -> dict:
    manifest = read_manifest(src)  # one-line errors for a missing folder / manifest
    kind = str(manifest.get("kind", ""))
    if kind == "checkpoint":
        raise PerseusError(f"{src} is a training checkpoint: export it first (perseus export {src} -o DIR)")
    if not kind.startswith(mf.KIND_ONNX):
        raise PerseusError(f"{src} holds a {kind!r} folder, expected an exported ONNX model folder")
    if kind != mf.KIND_ONNX or mf.QUANT_META in manifest:
        what = (manifest.get(mf.QUANT_META) or {}).get("scheme") or kind
        raise PerseusError(f"{src} is already quantized ({what}): quantize the fp32 export instead")
    target = (manifest.get(mf.LOWER_META) or {}).get("target", "portable")
    if target not in ("portable", wanted):
        raise PerseusError(f"{src} is lowered for {target}: quantize it with --target {target}, or export "
                           f"the checkpoint with --target {wanted} to quantize for {wanted}")
    manifest = verify_folder(src)  # sha256 of every file: missing, truncated or tampered files
    for name in (mf.MODEL_ONNX, mf.CONFIG, mf.TOKENIZER, mf.GENERATION_CONFIG):
        if name not in manifest.get("files", {}):
            raise PerseusError(f"{src}: {name} is not listed in the manifest (incomplete model folder)")
    return manifest


def _check_output(src: Path, out: Path, force: bool) -> None:
    same, out_inside, src_inside = same_or_inside(out, src)  # after `..` and symlinks
    if same:
        raise PerseusError(f"the output folder {out} is the model folder itself: choose another -o")
    if out_inside:
        raise PerseusError(f"the output folder {out} is inside the model folder {src}")
    if src_inside:
        raise PerseusError(f"the output folder {out} would replace the model folder {src}")
    if out.exists() and not out.is_dir():
        raise PerseusError(f"{out} exists and is not a folder")
    if out.exists() and not force and any(out.iterdir()):
        raise PerseusError(f"{out} already exists and is not empty (use --force to replace it)")
