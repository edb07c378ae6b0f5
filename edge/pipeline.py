"""The convert pipeline: load, split data, run each target, check, move into place."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

from calibration.folder import scan_folder
from calibration.imagenet import class_names
from calibration.preprocess import CROP
from calibration.source import image_dir_origin, resolve_image_dir
from calibration.splits import make_split
from edge import __version__
from edge.checks import NearTies, check_record, compare_logits, images_to_settle, interval_text
from edge.context import ArtifactResult, ConvertContext, PrecisionFailure, log, torch_logits
from edge.efficientmod import to_deploy
from edge.errors import ConfigError, ConversionError, EffmodError
from edge.manifest import (DERIVED_FILES, Artifact, Failure, Manifest, artifact_digest, artifact_problem, is_file_name,
                           refuse_in_the_way)
from edge.targets import TARGETS, get_target, resolve_precisions, validate_options
from edge.weights import load_model

LABELS_FILE = "labels.txt"


@dataclass
class ConvertRequest:
    """Everything ``effmod-edge convert`` takes; the CLI only fills this in."""

    targets: list[str]
    output: str | Path  # as given: Path("") would silently be "."
    model: str | None = None
    weights: str | None = None
    precisions: list[str] | None = None
    calib_dir: str | None = None
    calib_size: int = 200
    eval_size: int = 100
    seed: int = 0
    input_size: int = 224
    options: dict = field(default_factory=dict)
    labels: str | None = None  # class names, one per line (a fine-tune's own classes)

    def plan(self) -> dict[str, list[str]]:
        """Target -> precisions to build, validated against the target table."""
        self._check_types()
        if not self.targets:
            raise ConfigError(f"no target given; choose from {', '.join(TARGETS)}")
        plan = {}
        for name in dict.fromkeys(self.targets):
            spec = get_target(name)
            wanted = [p for p in (self.precisions or []) if p in spec.precision_names]
            plan[name] = resolve_precisions(spec, wanted or None)
        unknown = [
            p for p in (self.precisions or []) if not any(p in get_target(t).precision_names for t in plan)
        ]
        if unknown:
            choices = sorted({p for t in plan for p in get_target(t).precision_names})
            raise ConfigError(
                f"precision {unknown[0]!r} is not offered by target(s) {', '.join(plan)}; choose from {', '.join(choices)}"
            )
        for name in plan if self.precisions else ():  # a target none of --precision names would build all of its own
            spec = get_target(name)
            if len(spec.precision_names) > 1 and not set(self.precisions) & set(spec.precision_names):
                raise ConfigError(f"--precision {', '.join(self.precisions)} names none of {name}'s precisions "
                                  f"({', '.join(spec.precision_names)}); add the ones you want or drop --target {name}")
        self.options = validate_options(self.options)
        coreml = plan.get("coreml", [])
        if "w8a8" in coreml and self.options.get("deployment_target") == "iOS16":  # quantize ops need iOS 17
            if "w8a8" in (self.precisions or []):
                raise ConfigError("w8a8 needs --deployment-target iOS17 or newer (activation quantization); "
                                  "drop --precision w8a8 or raise the deployment target")
            coreml.remove("w8a8")
            log.info("coreml: w8a8 left out: iOS16 has no activation quantization (iOS17 or newer has)")
        if self.calib_size < 0 or self.eval_size < 1:
            raise ConfigError(f"--calib-size must be >= 0 and --eval-size >= 1 (got {self.calib_size}, {self.eval_size})")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be between 0 and 2**63-1 (got {self.seed})")
        if not str(self.output).strip():
            raise ConfigError("--output is empty; name the folder to write into, e.g. --output out")
        if self.model is not None and not self.model.strip():
            raise ConfigError("--model is empty; name a variant (effmod-edge models lists them) or leave it out "
                              "to detect it from --weights")
        calibrated = [f"{t}/{p}" for t, ps in plan.items() for p in ps if get_target(t).precision(p).calibrated]
        if self.calib_size == 0 and calibrated:
            raise ConfigError(f"{', '.join(calibrated)} need calibration images but --calib-size is 0; pass "
                              f"--calib-size N (default 200) or leave those out with --precision")
        return plan

    def _check_types(self) -> None:
        """What the CLI's click types guarantee, for callers of the Python API."""
        for name in ("targets", "precisions"):
            value = getattr(self, name)
            if not (value is None and name == "precisions") and not (
                    isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
                raise ConfigError(f"{name} must be a list of names, e.g. [\"onnx\"] (got {value!r})")
        for name in ("calib_size", "eval_size", "seed", "input_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be a whole number (got {value!r})")
        if self.input_size != CROP:
            raise ConfigError(f"input_size {self.input_size} is not supported: the preprocessing crops {CROP}x{CROP} "
                              f"(calibration/preprocess.py); leave input_size at {CROP}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"options must be a dict of option names to values (got {self.options!r})")


@dataclass
class ConvertResult:
    manifest: Manifest
    manifest_path: Path

    @property
    def failed(self) -> list[Failure]:
        return self.manifest.failures

    @property
    def below_threshold(self) -> list[Artifact]:
        return [a for a in self.manifest.artifacts if not a.checks.get("passed", False)]


STAGING_PREFIX, STAGING_LOCK = ".effmod-staging-", ".owner.lock"
_STAGING_LOCKS: dict[Path, int] = {}  # staging folder -> descriptor holding its lock for the conversion's life
_OUTPUT_LOCKS: dict[Path, int] = {}  # staging folder -> descriptor locking its output folder for the same time


class FolderInUse(ConfigError):
    """Another conversion holds the output folder: what exists there is that one's, this one touches nothing."""


def _lock_output(output: Path) -> int:
    """Lock the output folder itself, so two conversions never write into it at once.

    One that finished while another ran would leave files the other's manifest does not
    describe: the other read the folder's manifest before the first one replaced it."""
    fd = os.open(output, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderInUse(f"another convert is writing into {output}; wait for it to finish or choose another "
                          f"--output (nothing was written)") from None
    except OSError:
        os.close(fd)
        raise
    return fd


def lock_staging(staging: Path) -> None:
    """Lock the staging folder's lock file for as long as this process converts into it.

    Locked under a temporary name, then renamed: a sweep never sees the lock file unlocked."""
    tmp = staging / (STAGING_LOCK + ".new")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(tmp, staging / STAGING_LOCK)
    except OSError:
        os.close(fd)
        raise
    _STAGING_LOCKS[staging] = fd


def _unlock_staging(staging: Path) -> None:
    for locks in (_STAGING_LOCKS, _OUTPUT_LOCKS):
        fd = locks.pop(staging, None)
        if fd is not None:
            os.close(fd)


def release_staging(staging: Path) -> None:
    """Remove a locked staging (or evaluate work) folder, then drop its locks: unlocked first, another
    process's sweep could race the removal."""
    shutil.rmtree(staging, ignore_errors=True)
    _unlock_staging(staging)


def sweep_abandoned_staging(output: Path, prefix: str = STAGING_PREFIX) -> None:
    """Remove staging folders of killed conversions from ``output``: those whose lock nobody holds.

    The kernel drops a dead process's lock, whichever machine or PID namespace ran it (a live
    conversion elsewhere keeps its folder); a folder without a lock file is not ours to judge.
    ``prefix`` names other such folders (evaluate's work folders).
    """
    for d in output.resolve().glob(prefix + "*"):
        if d in _STAGING_LOCKS or not (d / STAGING_LOCK).is_file():
            continue
        try:
            fd = os.open(d / STAGING_LOCK, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: a conversion is writing there now
        finally:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)
        log.info("removed %s: left by a conversion that was killed", d.name)


def prepare_output(output: Path) -> Path:
    """Create ``output`` if needed and return a private staging folder inside it.

    The staging path is absolute: converters hand paths under it to subprocesses
    that run in other working directories (onnx2tf, the LiteRT worker). Staging
    folders that killed conversions left behind are removed first.
    """
    try:
        output.mkdir(parents=True, exist_ok=True)
        try:
            held = _lock_output(output)
        except OSError as exc:
            raise EffmodError(f"cannot lock the output folder {output} ({exc.strerror or exc}); choose an --output "
                              f"on a file system with file locks") from None
        try:
            sweep_abandoned_staging(output)
            warn_set_aside(output)
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output.resolve()))
        except BaseException:
            os.close(held)
            raise
        _OUTPUT_LOCKS[staging] = held
        try:
            lock_staging(staging)
        except OSError as exc:
            release_staging(staging)
            raise EffmodError(f"cannot lock a staging folder in {output} ({exc.strerror or exc}); choose an --output "
                              f"on a file system with file locks") from None
        return staging
    except OSError as exc:
        raise EffmodError(
            f"output folder {output} is not writable ({exc.strerror or exc}); choose another --output"
        ) from None


ASIDE_PREFIX = ".effmod-old-"  # + PID + "-" + name: an entry a conversion replaces, until its manifest is in place


class _Swap:
    """Moves staged entries into the output folder so that a failure can put the folder back.

    Each entry replaced (and each derived file removed) is first renamed aside in
    the same folder (a rename within one folder works on a read-only .mlpackage)
    and deleted by :meth:`commit` once the new manifest is in place; :meth:`undo`
    renames them back. What cannot be put back stays under its aside name.
    """

    def __init__(self) -> None:
        self.done: list[list] = []  # [dest, its previous entry's aside path or None, the new entry moved in]

    def _set_aside(self, dest: Path) -> Path | None:
        if not (dest.exists() or dest.is_symlink()):
            return None
        old = dest.with_name(f"{ASIDE_PREFIX}{os.getpid()}-{dest.name}")
        os.replace(dest, old)
        return old

    def put(self, src: Path, dest: Path) -> None:
        """Rename ``src`` over ``dest``; a folder (.mlpackage) replaces the old one whole."""
        self.done.append([dest, self._set_aside(dest), False])
        os.replace(src, dest)
        self.done[-1][2] = True

    def remove(self, dest: Path) -> bool:
        old = self._set_aside(dest)
        if old is not None:
            self.done.append([dest, old, False])
        return old is not None

    def commit(self) -> None:
        for _, old, _ in self.done:
            if old is not None:
                _remove(old)

    def undo(self) -> list[Path]:
        """Put every replaced or removed entry back, newest first; returns the aside paths left where they are."""
        left = []
        for dest, old, moved_in in reversed(self.done):
            try:
                is_dir = dest.is_dir() and not dest.is_symlink()
                if moved_in and (old is None or is_dir or (old.is_dir() and not old.is_symlink())):
                    if is_dir:
                        shutil.rmtree(dest)
                    else:  # a file put back over a file is replaced below in one rename
                        dest.unlink()
                if old is not None:
                    os.replace(old, dest)
            except OSError as exc:
                log.error("could not put %s back (%s)", dest.name, exc.strerror or exc)
                if old is not None:
                    left.append(old)
        return left


def warn_set_aside(output: Path) -> None:
    """Name the entries a conversion killed while moving its results left under their aside names."""
    for p in sorted(output.glob(ASIDE_PREFIX + "*")):
        log.warning("%s: an entry set aside by a conversion that stopped while moving its results into %s; "
                    "compare it with manifest.json, then delete it or rename it back", p.name, output)


def _check_destinations(staging: Path, output: Path, entries: list[str]) -> None:
    """Refuse, before anything moves, a destination that is a folder where a file goes (or the reverse)."""
    for entry in entries + ["manifest.json"]:
        refuse_in_the_way(output / entry, f"the {entry} this run writes", "move it away or choose another --output",
                          want_dir=(staging / entry).is_dir())


def resolve_class_names(labels: str | None, num_classes: int) -> tuple[list[str], bool]:
    """The model's class names in index order, and whether they are ImageNet-1k's (then images' labels count)."""
    if labels is None:
        if num_classes == 1000:
            return class_names(), True
        log.warning("the checkpoint's head has %d classes and no --labels was given: labels.txt names them "
                    "class_0 .. class_%d; pass --labels FILE (one name per line) to name them", num_classes,
                    num_classes - 1)
        return [f"class_{i}" for i in range(num_classes)], False
    path = Path(labels).expanduser()
    fix = "pass a UTF-8 text file with one class name per line, in class-index order"
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise ConfigError(f"--labels {path} not found; {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--labels {path} cannot be read ({getattr(exc, 'strerror', None) or exc}); {fix}") from None
    while names and not names[-1]:
        names.pop()
    if len(names) != num_classes:
        raise ConfigError(f"--labels {path} has {len(names)} names but the model has {num_classes} classes; {fix}")
    if "" in names:
        raise ConfigError(f"--labels {path} line {names.index('') + 1} is empty; {fix}")
    return names, names == class_names()


def run_target(ctx: ConvertContext, target: str, precisions: list[str]) -> tuple[list[ArtifactResult], list[Failure]]:
    """Run one target's converter; any exception becomes a timed failure for that target."""
    spec = get_target(target)
    start = time.perf_counter()
    missing = spec.missing_requirements()
    if missing:
        msg = f"{target} needs {', '.join(missing)}: install with {spec.install_hint}"
        return [], [Failure(target, p, msg, 0.0) for p in precisions]
    try:
        outcomes = spec.load_converter()(ctx, precisions)
    except Exception as exc:  # one target's crash must not stop the others
        log.debug("%s failed:\n%s", target, traceback.format_exc())
        secs = round(time.perf_counter() - start, 2)
        err = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return [], [Failure(target, p, err, secs) for p in precisions]
    secs = round(time.perf_counter() - start, 2)
    results = [o for o in outcomes if isinstance(o, ArtifactResult)]
    failures = [Failure(target, o.precision, o.error, secs if o.seconds is None else o.seconds, o.path)
                for o in outcomes if isinstance(o, PrecisionFailure)]
    return results, failures


def convert(request: ConvertRequest) -> ConvertResult:
    """Convert, check and record every requested target; see ``effmod-edge convert``."""
    plan = request.plan()
    image_dir = resolve_image_dir(request.calib_dir)
    folder = scan_folder(image_dir, image_dir_origin(request.calib_dir))
    loaded = load_model(request.model, request.weights, seed=request.seed)
    names, imagenet_classes = resolve_class_names(request.labels, loaded.num_classes)
    output = Path(request.output).expanduser()
    for name in ("manifest.json", LABELS_FILE):  # the artifacts' own names are checked again before they move
        refuse_in_the_way(output / name, f"the {name} this run writes", "move it away or choose another --output")
    created = [d for d in (output, *output.parents) if not d.exists()]  # leaf first: removed again on failure
    staging: Path | None = None
    done = False
    try:
        try:
            staging = prepare_output(output)  # the folder is ours (locked) from here to the end
        except FolderInUse:
            created = []  # the folders it would have made are the other conversion's now
            raise
        converted_before = (output / "manifest.json").is_file()  # then its evaluation/bench/report files are ours
        split = make_split(folder, request.calib_size, request.eval_size, request.seed)
        if not imagenet_classes:
            split = replace(split, calib=split.calib.without_labels(), eval=split.eval.without_labels())
        log.info("data: %s; calib %d, eval %d", folder.summary(), len(split.calib), len(split.eval))
        reference = torch_logits(loaded.model, split.eval.nchw())
        ctx = ConvertContext(
            loaded=loaded,
            deploy=to_deploy(loaded.model, request.input_size),
            split=split,
            reference=reference,
            work_dir=staging,
            seed=request.seed,
            input_size=request.input_size,
            options=dict(request.options),
            class_names=names,
            imagenet_classes=imagenet_classes,
        )
        manifest = Manifest(
            model=loaded.variant,
            weights=loaded.weights,
            weights_sha256=loaded.weights_sha256,
            data={**split.describe(), "labels": LABELS_FILE,
                  "labels_sha256": hashlib.sha256(("\n".join(names) + "\n").encode()).hexdigest()},
            num_classes=loaded.num_classes,
            imagenet_classes=imagenet_classes,
            tool={"name": "effmod-edge", "version": __version__, "input_size": request.input_size,
                  "seed": request.seed, "options": {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in request.options.items()}},
        ).validate()  # the run's own record is checked before hours of converting
        (staging / LABELS_FILE).write_text("\n".join(names) + "\n", encoding="utf-8")
        artifacts: list[Artifact] = []
        failures: list[Failure] = []
        all_results: list[ArtifactResult] = []
        near_ties = NearTies(reference)
        unsettled: list[tuple[str, int]] = []
        for target, precisions in plan.items():
            log.info("%s: converting %s", target, ", ".join(precisions))
            start = time.perf_counter()
            results, fails = run_target(ctx, target, precisions)
            failures += fails
            for r in results:
                threshold = get_target(target).precision(r.precision).threshold
                checks = check_record(compare_logits(reference, r.logits, split.eval.labels), threshold, near_ties)
                size, sha = artifact_digest(staging / r.path)
                artifact = Artifact(target, r.precision, r.path, size, sha, r.input, r.output, checks, r.details)
                try:  # now, not at the end: a bad record costs this artifact, not the whole run
                    artifact.validate(f"{target} {r.precision} {r.path}")
                except ConfigError as exc:
                    failures.append(Failure(target, r.precision, f"its manifest record is invalid, so it was not "
                                            f"written: {exc} (a bug in effmod-edge: please report it)",
                                            round(time.perf_counter() - start, 2), r.path))
                    continue
                artifacts.append(artifact)
                all_results.append(r)
                log.info(
                    "%s %s %s: max|Δ| %.3g, SQNR %.1f dB, agreement %.1f%% -> %s",
                    target, r.precision, r.path, checks["max_abs_diff"], checks["sqnr_db"],
                    100 * checks["top1_agreement"], "ok" if checks["passed"] else "; ".join(checks["misses"]),
                )
                if checks.get("agreement_bar_resolved") is False:
                    unsettled.append((f"{target} {r.precision} {interval_text(checks['top1_agreement_ci95'])}%",
                                      images_to_settle(threshold.min_agreement, checks["top1_agreement"])))
        if unsettled:
            finite = [n for _, n in unsettled if n < math.inf]
            how = [f"if the agreements hold, --eval-size {max(finite)} or more settles "
                   f"{'them' if len(finite) == len(unsettled) else 'the others'}"] if finite else []
            if len(finite) < len(unsettled):
                how.insert(0, "an agreement right at its bar settles with no number of images")
            log.warning("%d evaluation images cannot settle the agreement bars of %s (95%% intervals); %s; or run "
                        "`effmod-edge evaluate %s --heldout` on every image calibration left", len(split.eval),
                        ", ".join(u for u, _ in unsettled), "; ".join(how), output / "manifest.json")
        for f in failures:
            log.error("%s failed after %.1fs: %s", f.name, f.seconds, f.error)
        manifest.artifacts, manifest.failures = artifacts, failures
        manifest.validate()
        if not artifacts:
            first = f"{failures[0].name}: {failures[0].error}" if failures else "none ran"
            more = f" and {len(failures) - 1} more" if len(failures) > 1 else ""
            raise ConversionError(f"no artifact was built ({first}{more}); nothing was written to {output}; "
                                  f"fix that and re-run (-v shows tracebacks)")
        extra = [f for r in all_results for f in r.extra_files]
        entries = [LABELS_FILE] + sorted({a.path for a in artifacts} | set(extra))
        _check_destinations(staging, output, entries)
        manifest_path = output / "manifest.json"
        carried, retired = _previous_artifacts(output, manifest, plan, set(entries)) if converted_before else ([], [])
        manifest.artifacts += carried
        manifest.validate()
        try:  # before anything moves: a manifest that cannot be written moves nothing
            manifest.save(staging / "manifest.json")
        except OSError as exc:
            raise EffmodError(f"could not write the manifest into {staging} ({exc.strerror or exc}); nothing was "
                              f"moved into {output}: free some space or fix its permissions and convert again") from None
        with _signals_held():  # the folder changes as a whole: an interrupt lands after the manifest is in place
            swap = _Swap()
            try:
                for name in DERIVED_FILES if converted_before else ():  # they describe the files replaced now
                    if swap.remove(output / name):
                        log.info("removed %s: it described the previous conversion in %s", name, output)
                for entry in entries:
                    swap.put(staging / entry, output / entry)
                swap.put(staging / "manifest.json", manifest_path)
            except BaseException as exc:
                left = swap.undo()
                state = (f"and could not put back {', '.join(p.name for p in left)} (kept in {output} under that "
                         f"name: rename it back by hand)" if left else "and put the folder back as it was")
                if not isinstance(exc, OSError):
                    log.error("moving the results into %s failed, %s", output, state)
                    raise
                raise EffmodError(f"could not write {exc.filename2 or exc.filename or output} ({exc.strerror or exc}) "
                                  f"while moving the results into {output}, {state}; fix the folder's permissions "
                                  f"and convert again") from None
            swap.commit()
            done = True
            for name in retired:  # only once the new manifest is in place
                if _remove(output / name):
                    log.info("removed %s: the previous conversion's file, which this conversion did not rebuild", name)
        return ConvertResult(manifest, manifest_path)
    finally:
        if staging is not None:
            release_staging(staging)
        if not done:
            _remove_empty(created)


def artifact_files(a: Artifact) -> list[str]:
    """The files a manifest entry stands for: the artifact, its TFLite sidecar, its Core ML classifier package."""
    files = [a.path]
    if a.target == "tflite":
        files.append(a.path + ".json")
    classifier = a.details.get("classifier")
    if isinstance(classifier, dict) and isinstance(classifier.get("path"), str):
        files.append(classifier["path"])
    return [f for f in files if is_file_name(f)]


ARTIFACT_SUFFIXES = (".onnx", ".tflite", ".tflite.json", ".mlpackage")  # what a convert writes besides its manifest


def _same_conversion(old: Manifest, new: Manifest) -> bool:
    """Same checkpoint, classes, images and settings: the old manifest's checks hold for the new one."""
    keys = ("root", "seed", "calib_fingerprint", "eval_fingerprint", "calib_content_fingerprint",
            "eval_content_fingerprint", "labels_sha256")
    return (old.model, old.weights, old.weights_sha256, old.num_classes, old.imagenet_classes, old.tool) == \
        (new.model, new.weights, new.weights_sha256, new.num_classes, new.imagenet_classes, new.tool) and \
        all((old.data or {}).get(k) == (new.data or {}).get(k) for k in keys)


def _previous_artifacts(output: Path, new: Manifest, plan: dict[str, list[str]],
                        written: set[str]) -> tuple[list[Artifact], list[str]]:
    """What becomes of the files the folder's previous manifest recorded and this run does not rewrite.

    An artifact of a precision this run did not attempt, from the same conversion (see ``_same_conversion``)
    and unchanged on disk, stays and is carried into the new manifest (adding one precision keeps the
    others). Every other one is retired: left in place, it would sit beside a manifest that does not
    describe it (built from other weights, or a precision that failed this time).
    """
    try:
        old = Manifest.load(output / "manifest.json")
    except EffmodError as exc:  # which files it described is unknown: name what may be left undescribed
        left = sorted(p.name for p in output.iterdir() if p.name not in written and p.name != "manifest.json"
                      and p.name.endswith(ARTIFACT_SUFFIXES))
        log.warning("the folder's previous manifest could not be read, so the files it described are neither kept "
                    "in the new manifest nor removed: %s%s", exc,
                    f"; not in the new manifest: {', '.join(left)} (delete what you do not need)" if left else "")
        return [], []
    same = _same_conversion(old, new)
    carried, retired = [], []
    for a in old.artifacts:
        files = [f for f in artifact_files(a) if f not in written]
        if a.path in written or not files:
            continue
        keep = same and a.precision not in plan.get(a.target, []) and artifact_problem(output, a) is None
        if keep:
            carried.append(a)
        else:
            retired += [f for f in files if (output / f).exists() or (output / f).is_symlink()]
    return carried, retired


def _remove(path: Path) -> bool:
    """Remove a retired file or package; a failure is logged, never raised (the conversion itself is done)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return True
    except OSError as exc:
        log.warning("could not remove %s (%s); it is not in the new manifest: delete it by hand", path,
                    exc.strerror or exc)
        return False


@contextlib.contextmanager
def _signals_held():
    """Defer SIGINT and SIGTERM until the block is done, then deliver them (a no-op outside the main thread).

    Python handlers, not a signal mask: the process has other OS threads (torch's), and a signal
    they take still runs its Python handler in the main thread at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = [s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) is not None]  # None: a C handler
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in held:  # SIGTERM first: either one ends the process, and a SIGTERM must not be lost
            if s in caught:
                signal.raise_signal(s)


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (leaf first) while they are empty; never raises, so the run's own error is the one shown."""
    for d in folders:
        try:
            if not d.is_dir() or any(d.iterdir()):
                return
            d.rmdir()
        except OSError:
            return
