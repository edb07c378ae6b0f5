"""The one table of export targets and their precisions.

It feeds the CLI choices, option validation, the manifest schema and the
benchmarks. The converters keep their own per-precision dispatch (which
function builds which precision), keyed by the names this table defines.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

from edge.checks import Threshold
from edge.errors import ConfigError


@dataclass(frozen=True)
class PrecisionSpec:
    name: str
    description: str
    threshold: Threshold
    calibrated: bool = False


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    suffix: str
    converter: str  # "module:function", imported only when the target runs
    precisions: tuple[PrecisionSpec, ...]
    requires: tuple[str, ...] = ()
    install_hint: str = ""
    default_precisions: tuple[str, ...] = field(default=())

    @property
    def precision_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.precisions)

    def precision(self, name: str) -> PrecisionSpec:
        for p in self.precisions:
            if p.name == name:
                return p
        raise ConfigError(
            f"target {self.name!r} has no precision {name!r}; choose from {', '.join(self.precision_names)}"
        )

    def missing_requirements(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def load_converter(self) -> Callable:
        module, func = self.converter.split(":")
        return getattr(importlib.import_module(module), func)


EXACT = Threshold(max_abs=1e-4)

TARGETS: dict[str, TargetSpec] = {
    t.name: t
    for t in (
        TargetSpec(
            name="onnx",
            description="ONNX opset 17, NCHW float32, batch 1 and dynamic batch (onnxruntime-checked)",
            suffix=".onnx",
            converter="converters.to_onnx:convert",
            precisions=(PrecisionSpec("fp32", "float32 weights and activations", EXACT),),
            requires=("onnx", "onnxruntime"),
        ),
        TargetSpec(
            name="tflite",
            description="TFLite via onnx2tf, NHWC input, LiteRT-checked in a subprocess",
            suffix=".tflite",
            converter="converters.to_tflite:convert",
            precisions=(
                PrecisionSpec("fp32", "float32", EXACT),
                PrecisionSpec("fp16", "float16 weights, float32 compute", Threshold(min_sqnr_db=50.0)),
                PrecisionSpec(
                    "dynamic", "int8 weights, float activations",
                    Threshold(min_sqnr_db=25.0, min_agreement=0.95),
                ),
                PrecisionSpec(
                    "int8", "full integer, per-channel weights, float-I/O and int8-I/O files",
                    Threshold(min_sqnr_db=25.0, min_agreement=0.99), calibrated=True,
                ),
                PrecisionSpec(
                    "int8-mixed", "int8 with the most sensitive ops kept in float",
                    Threshold(min_sqnr_db=25.0, min_agreement=0.99), calibrated=True,
                ),
            ),
            requires=("onnx2tf", "tensorflow", "ai_edge_litert", "onnxsim"),
            install_hint='pip install -e ".[tflite]"',
        ),
        TargetSpec(
            name="coreml",
            description="Core ML ML Program (.mlpackage), verified on Linux by a MIL interpreter",
            suffix=".mlpackage",
            converter="converters.to_coreml:convert",
            precisions=(
                PrecisionSpec("fp16", "float16 compute precision", Threshold(min_sqnr_db=40.0)),
                PrecisionSpec("fp32", "float32 compute precision", EXACT),
                PrecisionSpec("w8", "int8 per-channel weights", Threshold(min_agreement=0.99)),
                PrecisionSpec(
                    "w8a8", "int8 weights and calibrated activations",
                    Threshold(min_sqnr_db=25.0, min_agreement=0.99), calibrated=True,
                ),
                PrecisionSpec("pal6", "6-bit k-means weight palettes", Threshold(min_agreement=0.99)),
                PrecisionSpec("pal4", "4-bit k-means weight palettes", Threshold(min_agreement=0.90)),
            ),
            requires=("coremltools",),
            install_hint='pip install -e ".[coreml]"',
        ),
    )
}


@dataclass(frozen=True)
class OptionSpec:
    """A converter option: ``ConvertRequest.options[name]``, ``--option name=value`` on the CLI."""

    name: str
    target: str
    kind: str  # "choice", "int", "fraction", "bool", "list", "str"
    default: object
    description: str
    choices: tuple[str, ...] = ()

    def parse(self, value: object) -> object:
        """``value`` (a Python value or CLI text) as this option's type; ConfigError names a bad one."""
        bad = ConfigError(f"option {self.name}={value!r} is invalid: {self.hint()}")
        if self.kind == "choice":
            if str(value) not in self.choices:
                raise bad
            return str(value)
        if self.kind == "int":
            try:
                n = int(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise bad from None
            if n < 0:
                raise bad
            return n
        if self.kind == "fraction":
            if isinstance(value, bool):
                raise bad
            try:
                f = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise bad from None
            if not 0.0 <= f <= 1.0:  # also rejects nan
                raise bad
            return f
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise bad
            return text in ("true", "1", "yes")
        if self.kind == "list":
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
                raise bad
            return tuple(i.strip() for i in items if i.strip())
        return str(value)

    def hint(self) -> str:
        if self.kind == "choice":
            return f"choose from {', '.join(self.choices)}"
        return {"int": "a whole number >= 0", "fraction": "a number from 0 to 1", "bool": "true or false", "list": "comma-separated names"}.get(
            self.kind, "text"
        )


OPTIONS: dict[str, OptionSpec] = {
    o.name: o
    for o in (
        OptionSpec("deployment_target", "coreml", "choice", "iOS17", "minimum iOS of the packages",
                   ("iOS16", "iOS17", "iOS18")),
        OptionSpec("coreml_form", "coreml", "choice", "ane",
                   "graph layout: Neural-Engine-friendly or the plain deploy form", ("ane", "plain")),
        OptionSpec("coreml_weight_threshold", "coreml", "int", 2048,
                   "weight tensors with fewer elements stay float when compressing"),
        OptionSpec("coreml_float_ops", "coreml", "list", (), "MIL op names whose weights/inputs stay float"),
        OptionSpec("coreml_float_head", "coreml", "bool", True, "keep the classifier head's input fp16 in w8a8"),
        OptionSpec("license", "coreml", "str",
                   "Apache-2.0 (effmod-edge conversion code); weights under the license of their source",
                   "license string written into the package metadata"),
        OptionSpec("coreml_palette_budget", "coreml", "fraction", 0.15,
                   "pal6/pal4: largest fraction of palettized weights the layer search may keep int8 (0: off)"),
        OptionSpec("coreml_w8a8_float_budget", "coreml", "fraction", 0.2,
                   "w8a8: largest fraction of quantized conv inputs the activation search may leave fp16 (0: off)"),
        OptionSpec("coreml_ranges", "coreml", "choice", "mse",
                   "w8a8 activation ranges: MSE-optimal symmetric bound of the calibration histogram, or min/max",
                   ("mse", "minmax")),
        OptionSpec("tflite_weight_rounding", "tflite", "choice", "gptq",
                   "int8 / int8-mixed / dynamic weights: GPTQ rounding on calibration images, or the converter's nearest",
                   ("gptq", "nearest")),
        OptionSpec("coreml_weight_rounding", "coreml", "choice", "gptq",
                   "w8a8 and pal6/pal4 weights: GPTQ rounding on calibration images, or coremltools' nearest / k-means "
                   "(w8: see coreml_w8_rounding)",
                   ("gptq", "nearest")),
        OptionSpec("coreml_w8_rounding", "coreml", "choice", "nearest",
                   "w8 weights: nearest (data-free) or GPTQ rounding on the calibration images (w8a8's int8 "
                   "weights, with fp16 activations)",
                   ("nearest", "gptq")),
        OptionSpec("tflite_mixed_priority", "tflite", "choice", "accuracy",
                   "int8-mixed search: keep ops float until the agreement target is met (accuracy), or ship the "
                   "fastest step that meets the int8 SQNR bar (speed)",
                   ("accuracy", "speed")),
        OptionSpec("tflite_mixed_max_size", "tflite", "fraction", 0.30,
                   "int8-mixed: largest file size, as a fraction of the fp32 file's, up to which convs may be kept "
                   "float (their weights take 4 bytes instead of 1; 0: none)"),
        OptionSpec("tflite_ranges", "tflite", "choice", "mse",
                   "int8 activation ranges: MSE-optimal clipping of the calibration histogram, or plain min/max",
                   ("mse", "minmax")),
    )
}


def validate_options(options: dict) -> dict:
    """Every option with its default filled in; unknown names and bad values raise ConfigError."""
    unknown = [k for k in options if k not in OPTIONS]
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; choose from {', '.join(OPTIONS)}")
    return {name: spec.parse(options[name]) if name in options else spec.default for name, spec in OPTIONS.items()}


def parse_option_pairs(pairs: list[str] | tuple[str, ...]) -> dict:
    """``["key=value", ...]`` from the CLI into a dict (values still text)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {pair!r} is not KEY=VALUE; e.g. --option tflite_ranges=minmax")
        out[key.strip()] = value.strip()
    return out


def get_target(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise ConfigError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def resolve_precisions(target: TargetSpec, requested: list[str] | tuple[str, ...] | None) -> list[str]:
    """Requested precisions in table order (all of the target's when none given)."""
    if not requested:
        return list(target.default_precisions or target.precision_names)
    for name in requested:
        target.precision(name)
    return [p for p in target.precision_names if p in requested]
