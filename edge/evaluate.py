"""``effmod-edge evaluate``: every artifact of a manifest on the same images.

Results are cached per artifact under ``OUT/.effmod-cache``, keyed by the
artifact's SHA-256 and a hash of the images' cropped pixels and labels, so adding
one artifact to a manifest re-runs only that one, and same-named images of another
folder (or an edited image) are computed afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from calibration.folder import ImageFolder, scan_folder
from calibration.splits import Batch, calibration_batch, load_items, pick_balanced
from edge.bench import machine_info
from edge.checks import compare_logits
from edge.context import log, torch_logits
from edge.efficientmod import get_config
from edge.errors import CheckpointError, ConfigError, DataError, EffmodError
from edge.manifest import (EVALUATION_FILE, Artifact, Manifest, artifact_problem, refuse_in_the_way, require_writable,
                           write_files_atomic, write_json_atomic)
from edge.pipeline import lock_staging, release_staging, sweep_abandoned_staging
from edge.weights import file_sha256, load_model

CACHE_DIR = ".effmod-cache"


def _calibration_names(manifest: Manifest) -> set[str] | None:
    """Relative names of the images convert calibrated on; None when they cannot be known.

    Manifests before ``calib_images`` was recorded name only the calibration images' fingerprint: the
    split is re-created from the recorded folder, size and seed, and used only if the fingerprint matches.
    """
    d = manifest.data or {}
    if "calib_images" in d:
        return set(d["calib_images"])
    if d.get("calib_size") == 0:
        return set()
    root = Path(d.get("root", ""))
    if not ({"calib_size", "seed", "calib_fingerprint"} <= set(d) and root.is_dir()):
        return None
    calib = calibration_batch(scan_folder(root), d["calib_size"], d["seed"])
    return set(calib.names) if calib.fingerprint() == d["calib_fingerprint"] else None


def _manifest_root(manifest: Manifest) -> Path:
    """The image folder convert read, which must still be there."""
    d = manifest.data or {}
    if "root" not in d:
        raise DataError("the manifest does not record its image folder (data.root); pass --data DIR")
    root = Path(d["root"])
    if not root.is_dir():
        raise DataError(f"the manifest's image folder {root} is gone; pass --data DIR")
    return root


def _manifest_eval_split(manifest: Manifest, limit: int | None) -> tuple[Batch, dict]:
    """The evaluation images convert recorded, from the folder convert read them in."""
    d = manifest.data or {}
    root = _manifest_root(manifest)
    folder = scan_folder(root)
    names = d["eval_images"][:limit] if limit else d["eval_images"]
    wanted = {name: k for k, name in enumerate(names)}
    legacy = not any("/" in w for w in wanted)  # flat folders, and manifests that named files only
    items = [i for i in folder.items if (i.path.name if legacy else i.name) in wanted]
    if len(items) > len(wanted):
        raise DataError(f"the manifest names its evaluation images by file name only, and {root} has several "
                        f"files of one name in different class folders; re-run convert to record them by path")
    if len(items) < len(wanted):
        raise DataError(f"{len(wanted) - len(items)} of the manifest's {len(wanted)} evaluation images are not "
                        f"in {root}; put them back, or pass --data DIR")
    items.sort(key=lambda i: wanted[i.path.name if legacy else i.name])  # convert's order: its fingerprint
    batch = load_items(items, skipped := Counter())
    if len(batch) < len(items):
        raise DataError(f"{len(items) - len(batch)} of the manifest's {len(items)} evaluation images in {root} no "
                        f"longer decode ({', '.join(sorted(skipped))}); restore them, or pass --data DIR")
    recorded = d.get("eval_content_fingerprint")
    mine = (batch if manifest.imagenet_classes else batch.without_labels()).content_fingerprint()
    if len(names) == len(d["eval_images"]) and recorded is not None and mine != recorded:
        raise DataError(f"the manifest's evaluation images in {root} are not the pixels convert checked (content "
                        f"fingerprint {mine}, recorded {recorded}): an image was edited or replaced; restore them, "
                        f"or pass --data DIR (or --heldout) to evaluate on the folder as it is now")
    return batch, {"split": "manifest eval split", "root": str(root), "seed": d.get("seed"),
                   "skipped": dict(folder.skipped)}


def _held_out_pick(manifest: Manifest, data_dir: str | os.PathLike, limit: int | None, strict: bool) -> tuple[Batch, dict]:
    """A class-balanced pick from ``data_dir`` that leaves out every image convert calibrated on."""
    folder = scan_folder(data_dir, flag="--data")
    calib = _calibration_names(manifest)
    if calib is None:
        if strict:
            raise DataError("the manifest does not say which images calibration used, so none can be called held "
                            "out; re-run convert to record them, or pass --data DIR without --heldout")
        log.warning("the manifest does not say which images calibration used; this evaluation may include them "
                    "(re-run convert to record them)")
    kept = [i for i in folder.items if i.name not in calib] if calib else list(folder.items)
    batch = pick_balanced(ImageFolder(folder.root, kept, folder.skipped), limit, seed=0)
    excluded = None if calib is None else len(folder.items) - len(kept)
    if excluded:
        log.info("left out %d calibration images of %s", excluded, folder.root)
    return batch, {"split": "balanced pick", "root": str(folder.root), "seed": 0, "excluded_calibration": excluded,
                   "skipped": dict(folder.skipped)}


def _manifest_images(manifest: Manifest, data_dir: str | os.PathLike | None, limit: int | None,
                     heldout: bool = False) -> tuple[Batch, dict]:
    """The manifest's evaluation split; with ``heldout`` or ``data_dir``, a balanced pick without calibration images."""
    d = manifest.data or {}
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1 (got {limit}); leave it out to use every image")
    if heldout and data_dir is None:
        data_dir = _manifest_root(manifest)
    if data_dir is None:
        if not d.get("eval_images"):
            raise DataError("the manifest records no evaluation images; pass --data DIR")
        batch, source = _manifest_eval_split(manifest, limit)
    else:
        batch, source = _held_out_pick(manifest, data_dir, limit, strict=heldout)
    if not len(batch):
        raise DataError(f"no usable image left in {source['root']} (calibration images are left out); pass --data "
                        f"with a folder of valid JPEG/PNG images")
    return batch, {**source, "count": len(batch), "fingerprint": batch.fingerprint(),
                   "content_fingerprint": batch.content_fingerprint()}


def _load_cached(path: Path, rows: int) -> np.ndarray | None:
    """Cached logits, or None when absent or unusable (a damaged cache file is dropped and recomputed)."""
    if not path.is_file():
        return None
    try:
        logits = np.load(path, allow_pickle=False)
        if isinstance(logits, np.ndarray) and logits.ndim == 2 and len(logits) == rows:
            return logits
        problem = "not the logits of these images"
    except Exception as exc:  # any damage to a cache file means: compute it again
        problem = f"{type(exc).__name__}: {exc}"
    log.warning("ignoring the cache file %s (%s); computing it again", path, problem)
    with contextlib.suppress(OSError):
        path.unlink()
    return None


def _save_cached(path: Path, logits: np.ndarray) -> None:
    """Write through a temp file: an interrupted run leaves no truncated cache file. A failure only warns."""
    buf = io.BytesIO()
    np.save(buf, logits, allow_pickle=False)
    try:
        write_files_atomic([(path, buf.getvalue())])
    except OSError as exc:
        log.warning("could not cache %s (%s); the evaluation goes on without it", path.name, exc.strerror or exc)


WORK_PREFIX = ".work-"  # + random: one evaluate run's folder in the cache, locked while it runs


def _remove_old_work_folders(cache: Path) -> None:
    """Free what killed runs left (their image arrays: hundreds of MB each), and the ``cache/work`` folder
    earlier versions kept for good."""
    sweep_abandoned_staging(cache, WORK_PREFIX)
    old = cache / "work"
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)


def select_artifacts(manifest: Manifest, targets: list[str] | tuple[str, ...] = (),
                     precisions: list[str] | tuple[str, ...] = ()) -> list[Artifact]:
    """The manifest's artifacts of ``targets`` and ``precisions`` (empty: any); none matching is an error."""
    chosen = [a for a in manifest.artifacts
              if (not targets or a.target in targets) and (not precisions or a.precision in precisions)]
    if (targets or precisions) and not chosen:
        have = ", ".join(sorted({f"{a.target}/{a.precision}" for a in manifest.artifacts})) or "none"
        raise ConfigError(f"no artifact of the manifest matches --target {'/'.join(targets) or 'any'} --precision "
                          f"{'/'.join(precisions) or 'any'}; it has {have}")
    return chosen


def _checkpoint(manifest: Manifest) -> Path | None:
    """The manifest's checkpoint file (None for random weights); it must still be where convert read it."""
    if manifest.weights == "untrained":
        return None
    path = Path(manifest.weights)
    if path.is_dir():
        raise CheckpointError(f"the manifest's checkpoint {path} is a folder now; put the checkpoint file back there, "
                              f"or re-run convert with --weights pointing at it")
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()}, where evaluate runs)"
        raise CheckpointError(f"the manifest's checkpoint {path} is gone{where}; put it back there, or re-run "
                              f"convert with --weights pointing at it")
    return path


def _reference_model(manifest: Manifest):
    seed = int((manifest.tool or {}).get("seed", 0))
    path = _checkpoint(manifest)
    if path is not None and manifest.weights_sha256 and file_sha256(path) != manifest.weights_sha256:
        raise EffmodError(f"checkpoint {path} changed since the conversion (sha256 differs); re-run convert")
    try:
        return load_model(manifest.model, path, seed=seed).model
    except (CheckpointError, ConfigError) as exc:  # their fixes name convert's --model
        raise ConfigError(f"the manifest's model {manifest.model!r} and checkpoint do not load "
                          f"({str(exc).split(';')[0]}); restore manifest.json's 'model' or re-run convert") from None


def artifact_logits(root: Path, a: Artifact, batch: Batch, work: Path) -> np.ndarray:
    """Run one artifact on ``batch`` with the runtime its target needs."""
    path = root / a.path
    if a.target == "onnx":
        from converters.to_onnx import onnx_logits

        return onnx_logits(path, batch.nchw(), batch=1 if a.input.shape[0] == 1 else 16)
    if a.target == "tflite":
        from converters.to_tflite import litert_logits

        return litert_logits(path, batch.nhwc(), work)
    if a.target == "coreml":
        from converters.mil_interp import run_package

        return run_package(path, batch.pixels)
    raise EffmodError(f"no runtime for target {a.target!r}")


def evaluate_manifest(
    manifest_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    progress: bool = True,
    heldout: bool = False,
    targets: list[str] | tuple[str, ...] = (),
    precisions: list[str] | tuple[str, ...] = (),
) -> dict:
    """Evaluate the artifacts (all, or those of ``targets`` / ``precisions``) and PyTorch fp32.

    Writes ``evaluation.json`` beside the manifest. Images: the manifest's evaluation split by default.
    ``heldout`` (every image of the manifest's folder) or ``data_dir`` picks class-balanced images
    instead, never one that convert calibrated on.
    """
    manifest_path = Path(manifest_path)
    manifest = Manifest.load(manifest_path)
    root = manifest_path.resolve().parent  # workers run in their own folder: relative paths would miss
    get_config(manifest.model)
    artifacts = select_artifacts(manifest, targets, precisions)
    require_writable(root)
    refuse_in_the_way(root / EVALUATION_FILE, f"the {EVALUATION_FILE} evaluate writes", "move it away")
    cache = root / CACHE_DIR
    refuse_in_the_way(cache, "evaluate's cache folder", "move it away", want_dir=True)
    if cache.is_symlink() and not cache.exists():
        raise ConfigError(f"{cache} is a broken link in the way of evaluate's cache; remove it (nothing was written)")
    batch, images = _manifest_images(manifest, data_dir, limit, heldout)
    if not manifest.imagenet_classes:  # a fine-tune's own classes: the images' ImageNet labels give no top-1
        batch = batch.without_labels()
    tool = manifest.tool or {}
    ref_id = f"{manifest.weights}|{manifest.weights_sha256}|{manifest.model}|{tool.get('seed', 0)}|{tool.get('input_size', 224)}"
    ref_key = hashlib.sha256(ref_id.encode()).hexdigest()[:16]  # random weights differ by seed
    ref_file = cache / f"reference-{ref_key}-{images['content_fingerprint']}.npy"
    reference = _load_cached(ref_file, len(batch))  # the checkpoint is only needed when these logits are not cached
    computed = reference is None
    if computed:  # a checkpoint that is gone fails here, before the cache folder exists
        reference = torch_logits(_reference_model(manifest), batch.nchw())
    with contextlib.ExitStack() as stack:
        cache.mkdir(exist_ok=True)
        try:  # the runtimes' inputs and outputs: this run's own folder, gone when it ends (the logits are cached)
            require_writable(cache)
            work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=cache))
            stack.callback(release_staging, work)
            lock_staging(work)  # a killed run's folder is swept by the next run: nobody holds its lock
        except (ConfigError, OSError) as exc:  # cached results still read; new ones are computed in a temp folder
            log.warning("%s; evaluating without writing to the cache", exc)
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="effmod-evaluate-")))
        _remove_old_work_folders(cache)
        if computed:
            _save_cached(ref_file, reference)
        rows = [{"target": "pytorch", "precision": "fp32", "path": "", "bytes": 0,
                 **compare_logits(reference, reference, batch.labels)}]
        for a in tqdm(artifacts, desc="evaluate", unit="artifact", disable=not progress):
            row = {"target": a.target, "precision": a.precision, "path": a.path, "bytes": a.bytes}
            problem = artifact_problem(root, a)
            if problem:
                rows.append({**row, "error": problem})
                continue
            cached = cache / f"logits-{a.sha256[:24]}-{images['content_fingerprint']}.npy"
            try:
                logits = _load_cached(cached, len(batch))
                if logits is None:
                    logits = artifact_logits(root, a, batch, work)
                    _save_cached(cached, logits)
                rows.append({**row, **compare_logits(reference, logits, batch.labels), "cached": cached.name})
            except Exception as exc:  # a runtime failure is a row's error, not the evaluation's
                log.error("evaluate %s %s failed: %s", a.target, a.path, exc)
                rows.append({**row, "error": f"{type(exc).__name__}: {exc}"})
        result = {"manifest": str(manifest_path), "model": manifest.model, "weights": manifest.weights,
                  "images": images, "machine": machine_info(), "rows": rows}
        write_json_atomic(root / EVALUATION_FILE, result)
    return result
