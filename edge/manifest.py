"""manifest.json: the validated contract between converters, apps and evaluators.

``Manifest.from_dict`` rejects unknown fields and names the bad value, so a
typo in a hand-edited manifest is an error, not a silently ignored key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edge.errors import ConfigError

SCHEMA_VERSION = 2  # 2: TensorSpec.normalization
READABLE_SCHEMA_VERSIONS = (1, 2)  # a version-1 manifest is read as version 2 (see _upgrade)
_SHA = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class TensorSpec:
    """What an app must feed or read: name, layout, dtype, shape and normalization.

    ``normalization`` says who applies ``(x / 255 - mean) / std``: ``"app"``
    (the app feeds normalized floats) or ``"in_model"`` (the app feeds 0-255
    pixels; mean and std record what the model applies itself).
    """

    name: str
    layout: str
    dtype: str
    shape: list[int | None]
    mean: list[float] | None = None
    std: list[float] | None = None
    quantization: dict | None = None
    normalization: str | None = None

    def validate(self, where: str) -> None:
        if self.layout not in ("NCHW", "NHWC", "NC", "image"):
            raise ConfigError(f"{where}.layout: {self.layout!r} is not one of NCHW, NHWC, NC, image")
        rank = {"NCHW": 4, "NHWC": 4, "NC": 2}.get(self.layout)
        if rank is not None and len(self.shape) != rank:
            raise ConfigError(f"{where}.shape: {self.shape} does not have the {rank} dimensions of layout {self.layout}")
        if self.dtype not in ("float32", "float16", "int8", "uint8", "image"):
            raise ConfigError(f"{where}.dtype: {self.dtype!r} is not a supported dtype")
        if self.normalization not in (None, "app", "in_model"):
            raise ConfigError(f"{where}.normalization: {self.normalization!r} is not one of app, in_model")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if self.normalization is not None and (values is None or len(values) != 3):
                raise ConfigError(f"{where}.{key}: normalization {self.normalization!r} needs one {key} per RGB "
                                  f"channel, got {values!r}")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ConfigError(f"{where}.std: {self.std} has a value that is not positive")


@dataclass
class Artifact:
    target: str
    precision: str
    path: str
    bytes: int
    sha256: str
    input: TensorSpec
    output: TensorSpec
    checks: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def validate(self, where: str) -> None:
        from edge.targets import get_target

        try:
            get_target(self.target).precision(self.precision)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        p = PurePosixPath(self.path)
        if p.is_absolute() or ".." in p.parts or not self.path:
            raise ConfigError(f"{where}.path: {self.path!r} must be relative to the manifest folder")
        if self.bytes < 0:
            raise ConfigError(f"{where}.bytes: {self.bytes} is negative")
        if not _SHA.match(self.sha256):
            raise ConfigError(f"{where}.sha256: {self.sha256!r} is not a hex SHA-256")
        self.input.validate(f"{where}.input")
        self.output.validate(f"{where}.output")
        check_metrics(self.checks, f"{where}.checks")
        check_mixed_details(self.details, f"{where}.details")
        check_json(self.checks, f"{where}.checks")
        check_json(self.details, f"{where}.details")


MIXED_STEP_FIELDS: dict[str, Any] = {  # an int8-mixed search step, as the report prints it
    "kept_nodes": int, "calib_agreement": float, "calib_sqnr_db": float, "bytes": int,
}
MIXED_STEP_OPTIONAL: dict[str, Any] = {
    "layernorm_stats_float": bool, "adds_float": bool, "meets_target": bool, "latency_ms": float,
    "latency_vs_first_step": float, "ended_search": str,
}
SENSITIVITY_FIELDS: dict[str, Any] = {"op": str, "tensor": str, "drop_db": float}


def check_mixed_details(details: dict, where: str) -> None:
    """The int8-mixed fields of an artifact's free-form details that the report reads have the types it needs."""
    if "sensitivity" not in details and "search" not in details:
        return
    for key, fields, optional in (("sensitivity", SENSITIVITY_FIELDS, {}),
                                  ("search", MIXED_STEP_FIELDS, MIXED_STEP_OPTIONAL)):
        rows = details.get(key)
        if not isinstance(rows, list):
            raise ConfigError(f"{where}.{key}: {rows!r} is not a list (an int8-mixed record has both "
                              f"sensitivity and search)")
        for i, row in enumerate(rows):
            at = f"{where}.{key}[{i}]"
            if not isinstance(row, dict):
                raise ConfigError(f"{at}: expected an object, got {row!r}")
            for name, tp in fields.items():
                if name not in row:
                    raise ConfigError(f"{at}: missing field {name!r}")
                _check_type(row[name], tp, f"{at}.{name}")
            for name, tp in optional.items():
                if name in row:
                    _check_type(row[name], tp, f"{at}.{name}")
            if key == "search" and ("latency_ms" in row) != ("latency_vs_first_step" in row):
                raise ConfigError(f"{at}: latency_ms and latency_vs_first_step go together (the search times "
                                  f"every step against the first)")
    _check_type(details.get("kept_float_op_types", []), list[str], f"{where}.kept_float_op_types")
    _check_type(details.get("kept_float_nodes", []), list[Any], f"{where}.kept_float_nodes")


def check_json(value: Any, where: str) -> None:
    """``value`` writes as JSON: free-form fields hold no NumPy scalars, arrays or other Python objects."""
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot be written as JSON ({exc})") from None


METRIC_FIELDS = ("top1", "top5", "top1_agreement", "sqnr_db", "cosine", "max_abs_diff")  # numbers where present


def is_number(v: object) -> bool:
    """An int or float from JSON (not a bool, which Python counts as an int)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_metrics(row: dict, where: str) -> None:
    """The metric fields a report reads are numbers (or null), and an agreement interval is two of them."""
    for key in METRIC_FIELDS:
        v = row.get(key)
        if v is not None and not is_number(v):
            raise ConfigError(f"{where}.{key}: {v!r} is not a number")
    ci = row.get("top1_agreement_ci95")
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(is_number(x) for x in ci)
                               and 0.0 <= ci[0] <= ci[1] <= 1.0):
        raise ConfigError(f"{where}.top1_agreement_ci95: {ci!r} is not a [low, high] pair of fractions "
                          f"(0 <= low <= high <= 1)")


@dataclass
class Failure:
    target: str
    precision: str
    error: str
    seconds: float
    path: str | None = None  # the file it is about where a precision has several (ONNX fp32, TFLite int8); None: all

    @property
    def name(self) -> str:
        """``target/precision``, with the file where one was built (ONNX builds two fp32 files)."""
        return f"{self.target}/{self.precision}" + (f" {self.path}" if self.path else "")


DATA_FIELDS: dict[str, Any] = {  # the images a convert used (calibration.splits.Split.describe + labels file)
    "root": str, "seed": int, "calib_size": int, "eval_size": int, "calib_fingerprint": str,
    "eval_fingerprint": str, "eval_images": list[str], "calib_images": list[str], "skipped": dict, "labels": str,
    "calib_content_fingerprint": str, "eval_content_fingerprint": str, "labels_sha256": str,
}


TOOL_FIELDS: dict[str, Any] = {  # what wrote the manifest, and the settings evaluate and bench re-create
    "name": str, "version": str, "input_size": int, "seed": int, "options": dict,
}


@dataclass
class Manifest:
    model: str
    weights: str
    artifacts: list[Artifact] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    weights_sha256: str | None = None
    data: dict | None = None
    tool: dict = field(default_factory=dict)
    num_classes: int = 1000  # a fine-tune may have replaced ImageNet's head
    imagenet_classes: bool = True  # False: the classes are the user's, so ImageNet labels give no top-1
    schema_version: int = SCHEMA_VERSION

    def validate(self) -> "Manifest":
        if self.schema_version not in READABLE_SCHEMA_VERSIONS:
            newer = isinstance(self.schema_version, int) and self.schema_version > SCHEMA_VERSION
            raise ConfigError(f"schema_version: {self.schema_version} is not one this effmod-edge reads "
                              f"({', '.join(map(str, READABLE_SCHEMA_VERSIONS))})"
                              + ("; upgrade effmod-edge to read it" if newer else ""))
        for i, a in enumerate(self.artifacts):
            a.validate(f"artifacts[{i}]")
        for i, f in enumerate(self.failures):
            if f.path is not None and not is_file_name(f.path):
                raise ConfigError(f"failures[{i}].path: {f.path!r} is not a file name of the manifest's folder")
        if self.data is not None:
            unknown = sorted(set(self.data) - set(DATA_FIELDS))
            if unknown:
                raise ConfigError(f"manifest.data: unknown field(s) {', '.join(unknown)}")
            for key, value in self.data.items():
                _check_type(value, DATA_FIELDS[key], f"manifest.data.{key}")
        unknown = sorted(set(self.tool) - set(TOOL_FIELDS))
        if unknown:
            raise ConfigError(f"manifest.tool: unknown field(s) {', '.join(unknown)}")
        for key, value in self.tool.items():
            _check_type(value, TOOL_FIELDS[key], f"manifest.tool.{key}")
        check_json(self.tool, "manifest.tool")
        check_json(self.data, "manifest.data")
        if not 0 <= self.tool.get("seed", 0) < 2**63:
            raise ConfigError(f"manifest.tool.seed: {self.tool['seed']} is not between 0 and 2**63-1")
        if not 1 <= self.num_classes <= 100_000:
            raise ConfigError(f"manifest.num_classes: {self.num_classes} is not between 1 and 100000")
        if self.imagenet_classes and self.num_classes != 1000:
            raise ConfigError(f"manifest.imagenet_classes: true, but num_classes is {self.num_classes}, not 1000")
        if not 0 < self.tool.get("input_size", 224) <= 4096:
            raise ConfigError(f"manifest.tool.input_size: {self.tool['input_size']} is not an image size in pixels")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for f in d["failures"]:  # absent, not null: effmod-edge before Failure.path reads such manifests
            if f["path"] is None:
                del f["path"]
        return d

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        return _upgrade(_build(cls, data, "manifest").validate())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        named = path.name == "manifest.json"  # another file name is more likely a mix-up than a damaged manifest
        redo = "re-run convert to write it again" if named else "is it a manifest? pass OUT or OUT/manifest.json from a convert run"
        try:
            data = parse_json(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"manifest {path} not found; pass the manifest.json a convert wrote") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"manifest {path} is not valid JSON ({str(exc)[:80]}); {redo}") from None
        except OSError as exc:
            raise ConfigError(f"manifest {path} cannot be read ({exc.strerror or exc}); check the path and its "
                              f"permissions") from None
        except TooDeepError:
            raise ConfigError(f"manifest {path} nests too deeply to be a manifest; {redo}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            fix = "re-run convert to write a manifest this version reads" if named else redo
            raise ConfigError(f"{exc} in {path}; {fix}") from None

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(Path(path), self.to_dict())


def _upgrade(m: Manifest) -> Manifest:
    """A version-1 manifest as version 2: its normalization follows from the layout version 1 wrote.

    Version 1 recorded mean/std on every input; Core ML's ``image`` inputs took 0-255 pixels and
    normalized inside the model, every other input expected the app to normalize.
    """
    if m.schema_version != 1:
        return m
    for a in m.artifacts:
        if a.input.normalization is None and a.input.mean is not None and a.input.std is not None:
            a.input.normalization = "in_model" if a.input.layout == "image" else "app"
    m.schema_version = SCHEMA_VERSION
    return m.validate()


def artifact_digest(path: Path) -> tuple[int, str]:
    """Bytes and SHA-256 of an artifact; a folder (.mlpackage) hashes its sorted files."""
    import hashlib

    from edge.weights import file_sha256

    if path.is_file():
        return path.stat().st_size, file_sha256(path)
    h = hashlib.sha256()
    size = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        h.update(file_sha256(f).encode())
        size += f.stat().st_size
    return size, h.hexdigest()


def is_file_name(name: object) -> bool:
    """A plain name of a file in the manifest's own folder (no path, not . or ..)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def artifact_problem(root: Path, artifact: Artifact) -> str | None:
    """Why ``artifact`` under ``root`` cannot be trusted (missing, unreadable, changed), or None."""
    try:
        return _artifact_problem(root, artifact)
    except OSError as exc:
        return (f"artifact file {artifact.path} (or a file of it) cannot be read ({exc.strerror or exc}); "
                f"fix its permissions")


def _artifact_problem(root: Path, artifact: Artifact) -> str | None:
    path = root / artifact.path
    if not path.exists():
        return f"artifact file {artifact.path} is missing"
    if artifact_digest(path)[1] != artifact.sha256:
        return f"artifact file {artifact.path} does not match its sha256 in the manifest"
    if artifact.target == "tflite" and not (root / f"{artifact.path}.json").is_file():  # apps read its contract
        return f"sidecar {artifact.path}.json (input normalization and quantization for apps) is missing"
    classifier = artifact.details.get("classifier")
    if isinstance(classifier, dict) and "path" in classifier:  # the package apps ship
        name = classifier.get("path")
        if not is_file_name(name):
            return f"classifier package {name!r} of {artifact.path} is not a file name of the manifest's folder"
        cpath = root / name
        if not cpath.exists():
            return f"classifier package {classifier.get('path')} of {artifact.path} is missing"
        if isinstance(classifier.get("sha256"), str) and artifact_digest(cpath)[1] != classifier["sha256"]:
            return f"classifier package {classifier.get('path')} does not match its sha256 in the manifest"
    return None


MAX_JSON_DEPTH = 64  # ours nest about 6 deep


class TooDeepError(ValueError):
    """JSON nested deeper than any file of ours (checked before parsing: see :func:`parse_json`)."""


def parse_json(text: str) -> Any:
    """``json.loads``, refusing nesting past MAX_JSON_DEPTH before the parser sees it.

    The C parser recurses once per level. coremltools raises Python's recursion
    limit to 5000 on import, and a few thousand nested brackets then overflow the
    C stack: a segfault, not a RecursionError.
    """
    brackets = re.sub(r"[^\[\]{}]", "", re.sub(r'"(?:[^"\\]|\\.)*"', "", text))
    depth = 0
    for c in brackets:
        depth += 1 if c in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise TooDeepError(f"nested more than {MAX_JSON_DEPTH} deep")
    return json.loads(text)


EVALUATION_FILE, BENCH_FILE, REPORT_FILES = "evaluation.json", "bench.json", ("report.md", "report.html")
DERIVED_FILES = (EVALUATION_FILE, BENCH_FILE, *REPORT_FILES)  # made from a manifest; stale once it is replaced
# bench.json rows that time no file of the manifest (their path is empty), by target: the name tables give them
REFERENCE_LABELS = {"pytorch": "(eager)", "onnx": "(bench export)"}


def reference_label(row: dict) -> str:
    """The name a bench row goes by in tables: its file, or for a row bench added, its label."""
    return row["path"] or REFERENCE_LABELS.get(row["target"], f"({row['target']})")


def refuse_in_the_way(dest: Path, what: str, fix: str, want_dir: bool = False) -> None:
    """Fail, before anything is written, when ``dest`` exists as a folder where a file goes (or the reverse)."""
    if dest.exists() and dest.is_dir() != want_dir:
        kind = "a folder" if dest.is_dir() else "a file"
        raise ConfigError(f"{dest} is {kind} in the way of {what}; {fix} (nothing was written)")


def require_writable(folder: Path) -> None:
    """Fail up front, with the fix, when results cannot be written into ``folder``."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".effmod-write-test-")
    except OSError as exc:
        raise ConfigError(f"cannot write into {folder} ({exc.strerror or exc}); make it writable or copy the "
                          f"output folder somewhere writable") from None
    os.close(fd)
    os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) through a temp file in the same folder, then rename into place."""
    write_files_atomic([(path, text.encode("utf-8"))])


def write_files_atomic(files: list[tuple[Path, bytes]]) -> None:
    """Write every file to a temp file beside it first, then rename them all into place.

    A full disk or a write error leaves every destination as it was: none is renamed until all are written.
    """
    tmps: list[str] = []
    try:
        for path, data in files:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            tmps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
        for (path, _), tmp in zip(files, tmps):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            Path(tmp).unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temp file in the same folder, then rename into place."""
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check_type(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported schema type {tp}")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing field {name!r}")
            continue
        kwargs[name] = _check_type(data[name], hints[name], f"{where}.{name}")
    return cls(**kwargs)
