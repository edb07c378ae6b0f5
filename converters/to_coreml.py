"""Core ML target: ML Program packages, app-ready, verified on Linux by a NumPy MIL interpreter.

Per precision this writes ``<stem>_<precision>.mlpackage`` (image in, ``logits``
out) and, for the shipping precisions, ``<stem>_<precision>_classifier.mlpackage``
(image in, ``classLabel`` + ``classLabel_probs`` out: the logits package's program,
weights and compression included, plus softmax and Core ML's classify). Both take an RGB
224x224 ``image``; the exact per-channel ImageNet normalization is inside the
model (Core ML's image scale is one scalar), so ImageType uses scale 1, bias 0.

Conversion goes through ``torch.export`` of the deploy form: by default the ANE
form of :mod:`edge.ane` (option ``coreml_form="plain"`` takes
:class:`edge.efficientmod.EfficientModDeploy` as it is).

Precisions: fp32 / fp16 compute precision; ``w8`` int8 per-channel weights;
``pal6`` / ``pal4`` per-tensor weight palettes, with the layers whose
palette costs the most accuracy per element kept int8; ``w8a8`` int8 weights
plus int8 activations at every conv input, whose ranges come from running the
fp16 package through :mod:`converters.mil_interp` on the calibration images
(coremltools' own calibration calls ``MLModel.predict``, macOS only); the
quantize/dequantize pairs are inserted by a small MIL graph pass here. The
classifier head stays float for w8a8 activations and palettes. The compressed
packages start from the fp16 program, as shipped to devices.

Options (``ctx.options``): ``deployment_target`` (iOS16, iOS17 default, iOS18),
``coreml_form`` (ane default, plain), ``coreml_weight_threshold`` (weights with
fewer elements stay float; 2048), ``coreml_float_ops`` (op names kept float),
``coreml_float_head`` (True), ``coreml_ranges`` (w8a8 activation ranges: mse default, minmax),
``coreml_palette_budget`` (fraction of palettized weights the layer search of
:mod:`converters.coreml_palette` may keep int8; 0.15, 0 turns it off),
``coreml_weight_rounding`` (w8a8 and palette weights: ``gptq`` default, ``nearest``),
``coreml_w8_rounding`` (w8 weights: ``nearest`` default, data-free; ``gptq`` uses w8a8's GPTQ weights),
``coreml_w8a8_float_budget`` (fraction of w8a8's quantized conv inputs the search
of :mod:`converters.coreml_act_search` may leave fp16; 0 turns it off).

w8a8 is converted from a copy of the network whose weights are GPTQ-rounded onto
coremltools' int8 grid on the calibration images (:mod:`calibration.gptq`):
coremltools then stores exactly those weights. The palettes likewise: every
palettized weight is GPTQ-rounded onto its own per-tensor k-means palette (iOS 18
``pal4``: one palette per group of ``PALETTE_GROUP`` output channels, as
coremltools' grouped-channel palettes), the layers the search keeps onto the
int8 grid, and coremltools' ``unique`` mode stores those values. ``w8`` stays
data-free (nearest rounding) unless ``coreml_w8_rounding=gptq`` asks for the
GPTQ int8 weights of w8a8. The programs of these GPTQ networks are the fp16 program
with their weights swapped in (:func:`swap_weights`), not exported and converted again.

Every reported logit is computed by the interpreter from the *saved* package.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn as nn

from calibration.gptq import palette_grid
from calibration.imagenet import class_names
from calibration.preprocess import CROP, MEAN, RESIZE, STD
from edge import __version__
from edge.context import ArtifactResult, ConvertContext, PrecisionFailure, log
from edge.errors import ConfigError, ConversionError
from edge.manifest import TensorSpec, artifact_digest
from edge.targets import validate_options

if TYPE_CHECKING:
    from calibration.gptq import LayerRounder
    from converters.coreml_act_search import ActivationSearch
    from converters.coreml_palette import PaletteSearch

FORMS = ("ane", "plain")
DEPLOYMENT_TARGETS = ("iOS16", "iOS17", "iOS18")
COMPRESSED = ("w8", "w8a8", "pal6", "pal4")
CLASSIFIER_PRECISIONS = ("fp16", "w8", "w8a8", "pal6", "pal4")
WEIGHT_THRESHOLD = 2048  # coremltools' default: smaller weight tensors stay float
PALETTE_BITS = {"pal6": 6, "pal4": 4}
PALETTE_GROUP = 16  # output channels per palette of iOS 18 pal4 (grouped-channel palettes)
CLASSIFIER_CHECK_IMAGES = 4
NEAREST = {"method": "nearest (coremltools' own rounding)"}
KMEANS = {"method": "coremltools k-means palettes of the float weights (nearest palette value)"}
FLOAT = "float"  # the network as loaded, before any rounding
PALETTE_SEARCH_IMAGES = 16  # calibration images for the per-layer palette noise (PyTorch)
# Smallest activation range quantized: the int8 scale (range / 127) must be a normal fp16
# number, or it underflows to 0 in an fp16 program. Tensors this small (e.g. LayerScale-damped
# branch outputs of a randomly initialised model) lose only values below 3e-5.
MIN_RANGE = 127 * 2.0**-14
RANGE_CACHE_BYTES = 3 * 2**30  # w8a8 ranges: quantized tensors kept from the min/max pass for the histogram pass
PREPROCESSING = (
    f"RGB; resize shorter side to {RESIZE} (bicubic); center crop {CROP}x{CROP}; feed 0..255 pixels. "
    f"Inside the model: x/255, minus mean {list(MEAN)}, divided by std {list(STD)} per channel."
)


class PixelInput(nn.Module):
    """``net`` behind the exact ImageNet normalization: takes 0..255 RGB pixels (NCHW)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(MEAN, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD, dtype=torch.float32).reshape(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net((pixels / 255.0 - self.mean) / self.std)


def classifier_labels(names: list[str] | None = None) -> list[str]:
    """The class names (ImageNet-1k's by default), made unique for Core ML's label -> probability dictionary.

    ImageNet-1k has two names used twice ("crane": bird and machine, "maillot");
    those get their wnid appended, e.g. ``crane (n02012849)``. A repeated name of
    a fine-tune's own classes gets its class index appended, e.g. ``cat (7)``, and
    again while that is another class's name too (a class literally named ``cat (7)``).
    """
    from collections import Counter

    from calibration.imagenet import wnids

    imagenet = class_names()
    names = imagenet if names is None else names
    tags = wnids() if names == imagenet else [str(i) for i in range(len(names))]
    dup = {n for n, c in Counter(names).items() if c > 1}
    given, used, out = set(names), set(), []
    for n, t in zip(names, tags):
        label = n
        while label in dup or label in used or (label != n and label in given):
            label = f"{label} ({t})"
        used.add(label)
        out.append(label)
    return out


def _ct() -> Any:
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        import coremltools as ct
    return ct


@contextlib.contextmanager
def _quiet():
    """Silence coremltools' progress bars and version warnings during a call."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def deploy_target(name: str) -> Any:
    if name not in DEPLOYMENT_TARGETS:
        raise ConfigError(f"deployment_target {name!r} is not one of {', '.join(DEPLOYMENT_TARGETS)}")
    return getattr(_ct().target, name)


def network(ctx: ConvertContext, form: str) -> nn.Module:
    """The deploy-form network for ``form`` (``ane`` or ``plain``), same weights as ctx.deploy."""
    if form == "plain":
        return ctx.deploy
    if form == "ane":
        from edge.ane import to_ane

        return to_ane(ctx.deploy, ctx.input_size)
    raise ConfigError(f"coreml_form {form!r} is not one of {', '.join(FORMS)}")


def image_input(input_size: int) -> Any:
    """The packages' input: an RGB ``image``, 0..255 (the normalization is inside the model)."""
    ct = _ct()
    return ct.ImageType(name="image", shape=(1, 3, input_size, input_size), color_layout=ct.colorlayout.RGB,
                        scale=1.0, bias=[0.0, 0.0, 0.0], channel_first=True)


def build_mlmodel(net: nn.Module, input_size: int, compute_precision: str, target: str) -> Any:
    """Convert ``net`` (normalized NCHW in, logits out) to an in-memory ML Program."""
    ct = _ct()
    wrapped = PixelInput(net).eval()
    example = (torch.rand(1, 3, input_size, input_size) * 255.0,)
    with _quiet(), torch.no_grad():
        ep = torch.export.export(wrapped, example).run_decompositions({})
        return ct.convert(
            ep,
            inputs=[image_input(input_size)],
            outputs=[ct.TensorType(name="logits", dtype=np.float32)],
            convert_to="mlprogram",
            minimum_deployment_target=deploy_target(target),
            compute_precision=ct.precision.FLOAT16 if compute_precision == "fp16" else ct.precision.FLOAT32,
        )


def program_copy(mlmodel: Any) -> Any:
    """A fresh MIL program of ``mlmodel``, read back from its spec and weights, as coremltools'
    own compression passes do (``copy.deepcopy`` of the in-memory program exceeds Python's
    recursion limit on efficientmod_s)."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    spec = mlmodel.get_spec()
    return milproto_load(model_spec=spec, specification_version=spec.specificationVersion,
                         file_weights_dir=mlmodel.weights_dir)


def swap_weights(mlmodel: Any, old: nn.Module, new: nn.Module, input_size: int, target: str) -> Any | None:
    """The ML Program of ``new`` from ``mlmodel``, the program :func:`build_mlmodel` made of ``old``,
    where the two networks differ only in parameter values (GPTQ-rounded weights).

    Every parameter that differs must be stored as a const of its own, holding
    its old value in the const's dtype (coremltools' fp16 cast is NumPy's
    ``astype``); that const gets the new value, cast the same way, keeping its
    name and place. The result is the program a conversion of ``new`` gives, op for op and
    value for value (a test checks this), without its torch.export and conversion passes;
    its names are the float program's. None (convert ``new`` instead) where that cannot be
    guaranteed: a parameter not found (folded into another const, or stored other than by
    ``astype``: coremltools' fp16 pass lifts values that would underflow to zero in consts
    under 400 elements); two parameters on one const; a new value that equals another const
    (coremltools would share them) or overflows float16.
    """
    from coremltools.converters.mil import Builder as mb

    before = dict(old.named_parameters())
    changed = {n: p.detach().numpy() for n, p in new.named_parameters() if not torch.equal(p, before[n])}
    if not changed:
        return mlmodel
    prog = program_copy(mlmodel)
    func = prog.functions["main"]
    consts: dict[tuple[str, bytes], list[Any]] = {}
    for op in func.operations:
        val = op.outputs[0].val if op.op_type == "const" else None
        if isinstance(val, np.ndarray) and val.dtype in (np.float16, np.float32):
            consts.setdefault((val.dtype.str, val.tobytes()), []).append(op)
    dtypes = {np.dtype(d) for d, _ in consts}
    swaps: dict[str, tuple[Any, np.ndarray]] = {}
    for name, value in changed.items():
        old_value = before[name].detach().numpy()
        found = [(op, dt) for dt in dtypes for op in consts.get((dt.str, old_value.astype(dt).tobytes()), [])]
        if len(found) != 1 or found[0][0].name in swaps:
            return None
        op, dt = found[0]
        if dt == np.float16 and np.abs(value).max() > np.finfo(np.float16).max:
            return None
        swaps[op.name] = (op, value.astype(dt).reshape(op.outputs[0].shape))
    swaps = {n: (op, v) for n, (op, v) in swaps.items() if v.tobytes() != op.outputs[0].val.tobytes()}
    kept = {k for k, ops in consts.items() if any(op.name not in swaps for op in ops)}
    new_keys = [(v.dtype.str, v.tobytes()) for _, v in swaps.values()]
    if len(set(new_keys)) != len(new_keys) or any(k in kept for k in new_keys):
        return None
    with func:
        for old_name, (op, value) in swaps.items():
            out_name = op.outputs[0].name
            var = mb.const(val=value, name=f"{old_name}__swapped", before_op=op)
            func.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=var)
            func.remove_ops([op])
            var.op.name = old_name
            var.name = out_name
    return edited_model(prog, mlmodel, input_size, target)


def edited_model(prog: Any, source: Any, input_size: int, target: str, **convert_args: Any) -> Any:
    """The ML Program model of ``prog``, a program read from ``source`` (:func:`program_copy`) and edited:
    the packages' image input, no further conversion passes, and coremltools' record of where
    ``source`` came from (the torch version and dialect; else it would say ``milinternal``)."""
    ct = _ct()
    prog.functions["main"].set_input_types((image_input(input_size),))
    with _quiet():
        model = ct.convert(prog, convert_to="mlprogram", pass_pipeline=ct.PassPipeline.EMPTY,
                           minimum_deployment_target=deploy_target(target), compute_precision=ct.precision.FLOAT32,
                           **convert_args)
    for key, value in source.user_defined_metadata.items():
        if key.startswith("com.github.apple.coremltools."):
            model.user_defined_metadata[key] = value
    return model


def classifier_model(logits_model: Any, input_size: int, target: str, labels: list[str] | None = None) -> Any:
    """The classifier of a logits ML Program: the same program (weights, ops, compression, bit for bit)
    with a softmax on its logits, in the precision they are computed in, and Core ML's ``classify``.

    Built from the program (:func:`program_copy`), not exported again: no second torch.export,
    conversion or weight compression.
    """
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Block, types
    from coremltools.converters.mil.mil.scope import ScopeInfo, ScopeSource

    ct = _ct()
    prog = program_copy(logits_model)
    func = prog.functions["main"]
    (logits,) = func.outputs
    cast = logits.op if logits.op is not None and logits.op.op_type == "cast" else None
    source = cast.x if cast is not None else logits  # an fp16 program casts its logits to fp32 last
    with mb.scope(ScopeInfo(source=ScopeSource.COREMLTOOLS_GRAPH_PASS, data=["effmod_edge_classifier"])), func:
        probs = mb.softmax(x=source, axis=1)
        if source.dtype != types.fp32:
            probs = mb.cast(x=probs, dtype="fp32")
        Block._copy_scope_info(logits, probs)  # the new ops carry the scopes (export trace) of the logits
    func.set_outputs([probs])
    if cast is not None:
        func.remove_ops([cast])
    return edited_model(prog, logits_model, input_size, target,
                        classifier_config=ct.ClassifierConfig(classifier_labels(labels),
                                                              predicted_feature_name="classLabel"))


def stored_palette(nbits: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A coremltools ``lut_function`` storing weights already on a palette of at most ``2**nbits`` values, exactly.

    coremltools' own ``unique`` mode counts the values with ``np.unique`` on the
    float16 weights, and NumPy's float16 sort (its AVX-512 kernel, found on an
    AMD EPYC host) returns unsorted runs for large arrays with many repeats: 64
    values counted as 110, so 6-bit palettes were stored with 8-bit indices and
    a pal6 package came out larger than w8. Here the values are found in float32
    (exact for float16), the index width is ``nbits``, and a check that the LUT
    gives back every weight makes a wrong palette fail loudly.
    """
    size = 1 << nbits

    def lut_function(val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flat = np.asarray(val).reshape(-1)
        values, indices = np.unique(flat.astype(np.float32), return_inverse=True)
        if values.size > size:
            raise ConversionError(f"a weight meant for a {nbits}-bit palette holds {values.size} distinct values")
        lut = np.zeros(size, flat.dtype)
        lut[: values.size] = values.astype(flat.dtype)
        indices = indices.reshape(-1).astype(np.uint8)
        if not np.array_equal(lut[indices], flat):
            raise ConversionError(f"the {nbits}-bit palette does not give back the weights it stores")
        return lut, indices

    return lut_function


def compress_weights(
    mlmodel: Any,
    precision: str,
    target: str,
    threshold: int = WEIGHT_THRESHOLD,
    float_ops: tuple[str, ...] = (),
    int8_weights: tuple[str, ...] = (),
    unique_weights: tuple[str, ...] = (),
) -> Any:
    """int8 per-channel (``w8``/``w8a8``) or k-means palette (``pal6``/``pal4``) weights.

    Weights consumed by the ops named in ``float_ops`` stay fp16; for palettes,
    the weight consts named in ``int8_weights`` get int8 per-channel weights and
    those in ``unique_weights``, already on a palette, a palette of their own values.
    """
    import coremltools.optimize.coreml as cto

    skip = {name: None for name in float_ops}
    linear = cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=threshold
    )
    if precision in ("w8", "w8a8"):
        with _quiet():
            return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=linear,
                                                                               op_name_configs=skip))
    nbits = PALETTE_BITS[precision]
    group = palette_group_size(target, precision)
    granularity = ({"granularity": "per_grouped_channel", "group_size": group} if group
                   else {"granularity": "per_tensor"})
    op = cto.OpPalettizerConfig(mode="kmeans", nbits=nbits, weight_threshold=threshold, **granularity)
    skip.update({name: None for name in int8_weights})
    unique = cto.OpPalettizerConfig(mode="custom", lut_function=stored_palette(nbits), weight_threshold=threshold,
                                    **granularity)
    skip.update({name: unique for name in unique_weights if name not in skip})
    with _quiet():
        model = cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op, op_name_configs=skip))
        if int8_weights:
            model = cto.linear_quantize_weights(
                model, cto.OptimizationConfig(op_name_configs={name: linear for name in int8_weights}))
    return model


def _concat_groups(program: Any) -> list[set[str]]:
    """Sets of tensor names joined by concats (inputs and output, chained concats merged)."""
    groups: list[set[str]] = []
    for op in program.functions["main"].operations:
        if op.op_type != "concat":
            continue
        names = {v.name for v in op.inputs["values"]} | {op.outputs[0].name}
        for g in [g for g in groups if g & names]:
            names |= g
            groups.remove(g)
        groups.append(names)
    return groups


def _share_concat_ranges(program: Any, stats: dict[str, dict[str, float]]) -> None:
    """Give every tensor around a concat one common range (one scale in, one out)."""
    for g in _concat_groups(program):
        known = [stats[n] for n in g if n in stats]
        if not known:
            continue
        lo, hi = min(s["rmin"] for s in known), max(s["rmax"] for s in known)
        for n in g:
            if n in stats:
                stats[n] = {"rmin": lo, "rmax": hi}


QUANTIZED_OP_TYPES = ("conv", "linear")


def head_op_name(program: Any) -> str | None:
    """Name of the classifier head: the last conv/linear op of the program."""
    heads = [op.name for op in program.functions["main"].operations if op.op_type in ("conv", "linear")]
    return heads[-1] if heads else None


def _insert_activation_quant_pass(
    stats: dict[str, dict[str, float]], float_ops: tuple[str, ...], op_types: tuple[str, ...]
) -> Any:
    """A MIL graph pass putting int8 quantize -> dequantize in front of conv/linear/add inputs.

    One symmetric per-tensor pair per quantized tensor (scale = max|range| / 127 from
    ``stats``), shared by all of its quantized consumers; other consumers keep the
    float tensor. coremltools' own prefix/suffix passes are not used: in 9.0 they
    produced quantize/dequantize pairs with different scales on this model.
    """
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass

    class InsertActivationQuant(AbstractGraphPass):
        def apply(self, prog: Any) -> None:
            block = prog.functions["main"]
            dequantized: dict[str, Any] = {}
            with block:
                for op in list(block.operations):
                    if op.op_type not in op_types or op.name in float_ops:
                        continue
                    keys = ("x", "y") if op.op_type == "add" else ("x",)
                    live = [k for k in keys if op.inputs[k].op is None or op.inputs[k].op.op_type != "const"]
                    if len(live) != len(keys) or not all(op.inputs[k].name in stats for k in keys):
                        continue
                    args = dict(op.inputs)
                    for k in keys:
                        var = op.inputs[k]
                        if var.name not in dequantized:
                            rng = stats[var.name]
                            np_dt = np.float16 if var.dtype == types.fp16 else np.float32
                            scale = np_dt(max(abs(rng["rmin"]), abs(rng["rmax"])) / 127.0)
                            q = mb.quantize(input=var, scale=scale, output_dtype="int8", before_op=op)
                            dequantized[var.name] = mb.dequantize(input=q, scale=scale, before_op=op)
                        args[k] = dequantized[var.name]
                    out_name = op.outputs[0].name
                    new = getattr(mb, op.op_type)(**args, name=op.name, before_op=op)
                    block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new)
                    block.remove_ops([op])
                    new.name = out_name

    return InsertActivationQuant()


def quantize_activations(
    mlmodel: Any,
    stats: dict[str, dict[str, float]],
    float_ops: tuple[str, ...] = (),
    op_types: tuple[str, ...] = QUANTIZED_OP_TYPES,
) -> Any:
    """int8 activations at the inputs of every ``op_types`` op, with the given calibrated ranges.

    ``float_ops`` names ops whose inputs stay float. matmul, einsum, softmax,
    layer_norm, gelu and the modulation ``mul`` stay float by construction;
    residual ``add`` stays float unless ``op_types`` includes it (per-tensor int8
    on the residual stream measured 2-8 dB worse on xxs, and coremltools'
    add-scale normalization then overflows fp16 when one branch is tiny).
    """
    from coremltools.converters.mil.frontend.milproto import load as milproto
    from coremltools.models import utils as model_utils

    with _quiet():
        return model_utils._apply_graph_pass(
            mlmodel,
            [_insert_activation_quant_pass(stats, float_ops, op_types)],
            spec_version=8,
            pymil_load_func=milproto.load,
            skip_model_load=True,
        )


def describe(mlmodel: Any, ctx: ConvertContext, precision: str, form: str, target: str, classifier: bool) -> None:
    """App-facing metadata: author, license, version, descriptions, user-defined keys."""
    variant = ctx.loaded.variant
    mlmodel.author = f"effmod-edge {__version__}; EfficientMod architecture by Ma et al. (ICLR 2024)"
    mlmodel.license = validate_options(ctx.options)["license"]
    mlmodel.version = __version__
    kind = "classifier (classLabel + probabilities)" if classifier else "raw logits"
    n = ctx.loaded.num_classes
    classes = "ImageNet-1k" if ctx.imagenet_classes else f"{n}-class"
    mlmodel.short_description = (
        f"EfficientMod {variant} {classes} image classifier, {kind}, {precision} Core ML ML Program "
        f"({form} form). Input: RGB {ctx.input_size}x{ctx.input_size} image; normalization is inside the model."
    )
    mlmodel.input_description["image"] = (
        f"RGB image, {ctx.input_size}x{ctx.input_size}, resized (shorter side {RESIZE}, bicubic) and "
        f"center-cropped; pixels 0..255, no normalization needed"
    )
    if classifier:
        mlmodel.output_description["classLabel"] = f"most likely {classes} class name"
        mlmodel.output_description["classLabel_probs"] = f"softmax probability of every {classes} class"
    else:
        mlmodel.output_description["logits"] = f"(1, {n}) {classes} logits in class-index order (labels.txt)"
    meta = {
        "variant": variant,
        "weights_source": Path(ctx.loaded.weights).name,  # not the build machine's folders: the app ships this
        "weights_sha256": ctx.loaded.weights_sha256 or "",
        "untrained": str(ctx.loaded.untrained).lower(),
        "precision": precision,
        "form": form,
        "deployment_target": target,
        "preprocessing": PREPROCESSING,
        "labels": ("ImageNet-1k, class index = sorted wnid order (labels.txt beside the package)"
                   if ctx.imagenet_classes else f"{n} classes of a fine-tune, in labels.txt order (beside the package)"),
        "converter": f"effmod-edge {__version__} converters.to_coreml",
    }
    if classifier:
        meta["com.apple.coreml.model.preview.type"] = "imageClassifier"
    for k, v in meta.items():
        mlmodel.user_defined_metadata[k] = v


CONVERSION_DATE_KEY = "com.github.apple.coremltools.conversion_date"
DEBUG_MAP = "executorch_debug_handle_mapping.json"  # coremltools' op-name map, not part of the model


def _save(mlmodel: Any, path: Path) -> None:
    """Save a package byte-for-byte reproducibly (see :func:`make_reproducible`)."""
    if path.exists():
        shutil.rmtree(path)
    if CONVERSION_DATE_KEY in mlmodel.user_defined_metadata:
        del mlmodel.user_defined_metadata[CONVERSION_DATE_KEY]
    with _quiet():
        mlmodel.save(str(path))
    make_reproducible(path)


def make_reproducible(package: Path) -> None:
    """Give a saved .mlpackage the same bytes for the same model on every run.

    coremltools names the package's items with random UUIDs (Manifest.json) and
    writes the spec's metadata map in hash order; the items get UUIDs derived
    from their paths instead, and the spec is written with sorted map keys.
    The conversion date is dropped before saving (:func:`_save`). The debug map
    coremltools leaves beside Manifest.json after a torch.export conversion
    (``DEBUG_MAP``: op names, not part of the model, only in the converted
    packages) is removed, so a package holds its model and nothing else.
    """
    import json
    import uuid

    from coremltools.proto import Model_pb2

    (package / DEBUG_MAP).unlink(missing_ok=True)
    index = package / "Manifest.json"
    manifest = json.loads(index.read_text())
    renamed = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, "effmod-edge:" + item["path"])).upper()
               for old, item in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = dict(sorted((renamed[k], v) for k, v in manifest["itemInfoEntries"].items()))
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    index.write_text(json.dumps(manifest, indent=4) + "\n")
    spec_file = package / "Data" / manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    spec_file.write_bytes(spec.SerializeToString(deterministic=True))


def _summarize_check(check: dict, limit: int = 20) -> dict:
    from collections import Counter

    out = {k: v for k, v in check.items() if k not in ("fallback", "warnings")}
    out["fallback"] = check["fallback"][:limit]
    out["warnings_by_type"] = dict(Counter(w["type"] for w in check["warnings"]))
    out["warnings"] = check["warnings"][:limit]
    return out


def quantized_inputs(program: Any, op_types: tuple[str, ...] = QUANTIZED_OP_TYPES) -> set[str]:
    """Names of the non-const tensors feeding ``x`` of ``op_types`` ops: those w8a8 may quantize."""
    return {op.inputs["x"].name for op in program.functions["main"].operations
            if op.op_type in op_types and (op.inputs["x"].op is None or op.inputs["x"].op.op_type != "const")}


def range_cache_budget() -> int:
    """Bytes the w8a8 range cache may hold: ``RANGE_CACHE_BYTES``, or a quarter of the free memory if less."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not every OS reports free pages (macOS does not)
        return RANGE_CACHE_BYTES
    return int(min(RANGE_CACHE_BYTES, free // 4))


def calibration_stats(package: Path, pixels_nhwc: np.ndarray, method: str = "mse") -> dict[str, dict[str, float]]:
    """Per-tensor activation ranges of a saved float package over calibration images.

    ``method="minmax"``: each tensor's min/max. ``"mse"``: a second pass histograms
    the tensors w8a8 quantizes and narrows each to its MSE-optimal symmetric
    bound (:func:`calibration.ranges.mse_symmetric_bound`); it replays the copies
    of those tensors the first pass kept (up to :func:`range_cache_budget`) and runs
    the package only on the images that did not fit. Tensors joined by a concat
    share one range either way.
    """
    from converters.mil_interp import TensorCache, activation_histograms, activation_stats, image_feed, load_package

    pkg = load_package(package)

    def feeds(pixels: np.ndarray):
        return ({pkg.input_name: image_feed(pkg, img)} for img in pixels)

    quantized = quantized_inputs(pkg.program)
    cache = TensorCache(quantized, range_cache_budget()) if method == "mse" else None
    stats = activation_stats(pkg.program, feeds(pixels_nhwc), cache=cache)
    _share_concat_ranges(pkg.program, stats)
    if cache is not None:
        names = quantized & set(stats)
        ranges = {n: (stats[n]["rmin"], stats[n]["rmax"]) for n in names}
        log.debug("coreml w8a8: histograms replay %d of %d images (%.0f MiB cached)", cache.cached,
                  len(pixels_nhwc), cache.nbytes / 2**20)
        bounds = activation_histograms(pkg.program, feeds(pixels_nhwc[cache.cached:]), ranges,
                                       replay=cache.tensors).mse_bounds()
        del cache
        for g in _concat_groups(pkg.program):  # a concat group keeps one bound: its quantized members' widest
            narrowed = [bounds[n] for n in g if n in bounds]
            if narrowed:
                for n in g & set(stats):
                    bounds[n] = max(narrowed)
        for n, t in bounds.items():
            stats[n] = {"rmin": -t, "rmax": t}
    for s in stats.values():
        if max(abs(s["rmin"]), abs(s["rmax"])) < MIN_RANGE:
            s["rmin"], s["rmax"] = min(s["rmin"], -MIN_RANGE), max(s["rmax"], MIN_RANGE)
    return stats


@dataclass
class PalettePlan:
    """How one palette precision's weights are made.

    ``weights`` names the network the package is converted from (``float``, or
    the precision when its weights are GPTQ-rounded); ``palettized`` are the
    parameters already on their palette (stored by coremltools' ``unique`` mode);
    empty means coremltools' own k-means palettizes the float weights.
    """

    weights: str
    search: PaletteSearch | None
    palettized: frozenset[str] = frozenset()
    rounding: dict[str, Any] = field(default_factory=lambda: dict(KMEANS))


class _Builder:
    """Builds (and caches) the networks, float ML Programs and searches one conversion needs."""

    def __init__(self, ctx: ConvertContext, form: str, target: str):
        self.ctx, self.form, self.target = ctx, form, target
        self.net = network(ctx, form)
        self._cache: dict[tuple[str, str], Any] = {}
        self._nets: dict[str, nn.Module] = {FLOAT: self.net}
        self.plans: dict[str, PalettePlan] = {}
        opts = validate_options(ctx.options)
        self.threshold = int(opts["coreml_weight_threshold"])
        self.palette_budget = float(opts["coreml_palette_budget"])
        self.rounding = opts["coreml_weight_rounding"]
        self.w8_gptq = opts["coreml_w8_rounding"] == "gptq"
        if self.w8_gptq and len(ctx.split.calib) == 0:
            log.warning("coreml w8: no calibration images, so nearest weight rounding instead of GPTQ "
                        "(use --calib-size > 0)")
            self.w8_gptq = False
        self.w8a8_float_budget = float(opts["coreml_w8a8_float_budget"])
        self.act_search: ActivationSearch | None = None
        self._rounder: LayerRounder | None = None
        self.rounding_summary: dict = NEAREST

    def float_model(self, compute_precision: str, weights: str = FLOAT) -> Any:
        """The float ML Program of the network named ``weights`` (see :meth:`weights_net`)."""
        key = (compute_precision, weights)
        if key not in self._cache:
            net = self.weights_net(weights)
            model = None
            if weights != FLOAT:
                model = swap_weights(self.float_model(compute_precision), self.net, net, self.ctx.input_size,
                                     self.target)
                if model is None:
                    log.info("coreml: the %s weights are not all plain consts of the float program; "
                             "converting that network again", weights)
            if model is None:
                model = build_mlmodel(net, self.ctx.input_size, compute_precision, self.target)
            self._cache[key] = model
        return self._cache[key]

    def rounder(self) -> LayerRounder:
        """GPTQ rounding of the compressed layers (more than the threshold's elements) on the calibration images."""
        from calibration.gptq import GPTQ_IMAGES, LayerRounder

        if self._rounder is None:
            images = self.ctx.split.calib.nchw()[:GPTQ_IMAGES]
            log.info("coreml: GPTQ input statistics on %d calibration images", len(images))
            # coremltools compresses weights with more than `threshold` elements
            self._rounder = LayerRounder(self.net, images, min_elements=self.threshold + 1)
        return self._rounder

    def weights_net(self, weights: str) -> nn.Module:
        """The network named ``weights``: ``float``, ``int8`` (every compressed layer GPTQ-rounded to int8,
        built here) or a palette precision (built by :meth:`palette_plan`)."""
        if weights == "int8" and weights not in self._nets:
            r = self.rounder()
            log.info("coreml: GPTQ int8 weight rounding")
            float_ops = validate_options(self.ctx.options)["coreml_float_ops"]
            skip: set[str] = set()
            if float_ops:  # their weights stay float: not rounded to int8 levels either
                from converters.coreml_palette import match_parameters, op_weights

                match = match_parameters(self.net, op_weights(self.float_model("fp16")._mil_program, "const"))
                skip = {match[op] for op in float_ops if op in match}
            layers = [n for n in r.layers if f"{n}.weight" not in skip]
            self._nets["int8"] = r.network({n: r.int8(n) for n in layers})
            self.rounding_summary = r.report("int8", layers).as_dict()
        return self._nets[weights]

    def search_images(self) -> np.ndarray:
        """The first calibration images, normalized NCHW, that the PyTorch-side searches measure on."""
        from calibration.splits import Batch

        calib, n = self.ctx.split.calib, PALETTE_SEARCH_IMAGES
        return Batch(calib.pixels[:n], calib.labels[:n], calib.names[:n]).nchw()

    def activation_search(self, stats: dict[str, dict[str, float]], float_ops: tuple[str, ...],
                          float_head: bool) -> ActivationSearch | None:
        """Which w8a8 conv inputs stay fp16 (:mod:`converters.coreml_act_search`); None when the budget is 0."""
        from converters.coreml_act_search import search

        if self.w8a8_float_budget <= 0:
            return None
        weights = _weights(self, "w8a8")
        base = self.float_model("fp16", weights)
        images = self.search_images()
        t = time.perf_counter()
        net = self.weights_net(weights)
        program = base._mil_program
        head = head_op_name(program) if float_head else None
        res = search(net, program, stats, quantized_inputs(program) & set(stats), images, self.w8a8_float_budget,
                     exclude=set(float_ops) | ({head} if head else set()))
        log.info("coreml w8a8: activation search kept %d of %d conv inputs fp16, calib SQNR %.1f -> %.1f dB (%.1f s)",
                 len(res.keep), res.candidates, res.predicted_sqnr_db["all_int8"],
                 res.predicted_sqnr_db["with_kept_fp16"], time.perf_counter() - t)
        if res.unmatched_ops:
            log.warning("coreml w8a8: %d quantized convs could not be tied to a PyTorch module and were not measured",
                        res.unmatched_ops)
        self.act_search = res
        return res

    def palette_plan(self, precision: str, base: Any, float_ops: tuple[str, ...]) -> PalettePlan:
        """Palette weights and the layer search for ``precision`` (once; ``base`` is the float logits program).

        With calibration images and ``coreml_weight_rounding=gptq`` every
        palettized layer is GPTQ-rounded onto its own k-means palette, and the
        search's kept layers onto the int8 grid; otherwise coremltools' k-means
        palettizes the float weights. ``float_ops`` stay fp16 either way.
        """
        from converters.coreml_palette import coreml_targets, match_parameters, op_weights, search

        if precision in self.plans:
            return self.plans[precision]
        calibrated = len(self.ctx.split.calib) > 0
        if not calibrated:
            log.warning("coreml %s: no calibration images, so k-means palettes without GPTQ and no layer search "
                        "(use --calib-size > 0 to measure and keep the noisiest layers int8)", precision)
        nbits, group = PALETTE_BITS[precision], palette_group_size(self.target, precision)
        gptq = calibrated and self.rounding == "gptq"
        int8 = None
        t = time.perf_counter()
        if gptq:
            r = self.rounder()
            match = match_parameters(self.net, op_weights(base._mil_program, "const"))
            skip = {match[op] for op in float_ops if op in match}
            log.info("coreml %s: GPTQ palette rounding", precision)
            # parameter -> layer; coremltools leaves a tensor whose channels do not split into groups fp16
            layer_of = {f"{n}.weight": n for n, layer in r.layers.items() if f"{n}.weight" not in skip
                        and (group is None or layer.weight.shape[0] % group == 0)}
            targets = {p: r.palette(n, nbits, group) for p, n in layer_of.items()}
            unmatched = 0

            def int8(param: str) -> torch.Tensor:
                return r.int8(layer_of[param])
        else:
            palettized = compress_weights(base, precision, self.target, self.threshold, float_ops=float_ops)
            targets, unmatched = coreml_targets(self.net, base._mil_program, palettized._mil_program)
        found = None
        if calibrated and self.palette_budget > 0:
            found = search(self.net, targets, self.search_images(), self.palette_budget, int8, unmatched)
            log.info("coreml %s: palette search kept %d layers int8 (%.1f s)", precision, len(found.keep),
                     time.perf_counter() - t)
            if found.unmatched_ops or not found.keep:
                log.warning("coreml %s: palette search kept %d layers; %d palettized convs could not be tied to "
                            "a PyTorch parameter and were not measured", precision, len(found.keep),
                            found.unmatched_ops)
        if not gptq:
            plan = PalettePlan(FLOAT, found)
        else:
            keep = set(found.keep) if found else set()
            self._nets[precision] = r.network({layer_of[p]: int8(p) if p in keep else w for p, w in targets.items()})
            grid = palette_grid(nbits, group)
            rounding = {"palettes": r.report(grid, [layer_of[p] for p in targets if p not in keep]).as_dict()}
            if keep:
                rounding["kept_int8"] = r.report("int8", [layer_of[p] for p in keep]).as_dict()
            plan = PalettePlan(precision, found, frozenset(targets) - keep, rounding)
        self.plans[precision] = plan
        return plan


def palette_group_size(target: str, precision: str) -> int | None:
    """Output channels per palette: ``PALETTE_GROUP`` for iOS 18 ``pal4`` (grouped-channel), else None (per tensor)."""
    return PALETTE_GROUP if target == "iOS18" and precision == "pal4" else None


def _weights(b: _Builder, precision: str) -> str:
    """The network ``precision`` is converted from (a key of :meth:`_Builder.weights_net`)."""
    if (precision == "w8a8" and b.rounding == "gptq") or (precision == "w8" and b.w8_gptq):
        return "int8"
    if precision in b.plans:
        return b.plans[precision].weights
    return FLOAT


def _compressed(b: _Builder, precision: str, stats: dict | None,
                float_ops: tuple[str, ...], float_head: bool) -> tuple[Any, list[str]]:
    """The package model for ``precision`` and the ops deliberately kept float."""
    from converters.coreml_palette import weight_consts

    cp = "fp32" if precision == "fp32" else "fp16"
    if precision in ("pal6", "pal4"):
        float_base = b.float_model(cp)
        float_head_op = head_op_name(float_base._mil_program) if float_head else None
        b.palette_plan(precision, float_base, tuple(float_ops) + ((float_head_op,) if float_head_op else ()))
    base = b.float_model(cp, _weights(b, precision))
    head = head_op_name(base._mil_program) if float_head else None
    kept = list(float_ops) + ([head] if head else [])
    model = base
    if precision == "w8a8":
        if b.act_search is not None:
            kept += [op for op in b.act_search.keep if op not in kept]
        model = quantize_activations(model, stats or {}, tuple(kept))
    if precision in ("w8", "w8a8"):
        model = compress_weights(model, precision, b.target, b.threshold, float_ops=tuple(float_ops))
    elif precision in ("pal6", "pal4"):
        plan = b.plans[precision]
        net = b.weights_net(plan.weights)
        keep = set(plan.search.keep) if plan.search else set()
        model = compress_weights(model, precision, b.target, b.threshold, float_ops=tuple(kept),
                                 int8_weights=weight_consts(base._mil_program, net, keep),
                                 unique_weights=weight_consts(base._mil_program, net, set(plan.palettized)))
    return model, (kept if precision in ("w8a8", "pal6", "pal4") else [])


def _one_precision(
    b: _Builder, precision: str, float_ops: tuple[str, ...], float_head: bool
) -> ArtifactResult:
    from converters.ane_check import check_program, compute_plan_devices
    from converters.mil_interp import classify_package, load_package, precision_histogram, run_package, weight_histogram

    ctx = b.ctx
    t0 = time.perf_counter()
    stats = None
    calib: dict[str, Any] = {}
    if precision == "w8a8":
        if b.target == "iOS16":
            raise ConfigError("w8a8 needs deployment_target iOS17 or newer (quantize/dequantize ops)")
        if len(ctx.split.calib) == 0:
            raise ConfigError("w8a8 needs calibration images: use --calib-size > 0")
        tmp = ctx.work_dir / f".{ctx.stem}_w8a8_calib_base.mlpackage"
        base = b.float_model("fp16", _weights(b, precision))
        describe(base, ctx, "fp16", b.form, b.target, False)
        _save(base, tmp)
        tc = time.perf_counter()
        method = validate_options(ctx.options)["coreml_ranges"]
        stats = calibration_stats(tmp, ctx.split.calib.pixels, method)
        shutil.rmtree(tmp, ignore_errors=True)
        b.activation_search(stats, float_ops, float_head)
        calib = {"images": len(ctx.split.calib), "tensors": len(stats), "mode": "linear_symmetric int8, per-tensor",
                 "ranges_from": "NumPy MIL interpreter on the fp16 package ("
                 + ("MSE-optimal symmetric bound of each histogram)" if method == "mse" else "min/max)"),
                 "seconds": round(time.perf_counter() - tc, 2)}
    model, kept_float = _compressed(b, precision, stats, float_ops, float_head)
    describe(model, ctx, precision, b.form, b.target, False)
    name = f"{ctx.stem}_{precision}.mlpackage"
    _save(model, ctx.work_dir / name)
    t_convert = time.perf_counter() - t0

    t1 = time.perf_counter()
    pkg = load_package(ctx.work_dir / name)
    logits = run_package(pkg, ctx.split.eval.pixels)
    t_verify = time.perf_counter() - t1
    program = pkg.program
    cp = "fp32" if precision == "fp32" else "fp16"
    details: dict[str, Any] = {
        "form": b.form,
        "deployment_target": b.target,
        "compute_precision": cp,
        "ops_by_precision": precision_histogram(program),
        "weight_ops": weight_histogram(program),
        "ane_check": _summarize_check(check_program(program)),
        "compute_plan": compute_plan_devices(ctx.work_dir / name),
        "verified_by": "converters.mil_interp (NumPy) on the saved package"
        + (", fp16 rounding after every op" if cp == "fp16" else ""),
        "seconds": {"convert": round(t_convert, 2), "verify": round(t_verify, 2)},
    }
    if precision in COMPRESSED:
        details["weight_threshold"] = b.threshold
    if precision in ("w8", "w8a8"):
        details["weight_rounding"] = b.rounding_summary if _weights(b, precision) == "int8" else NEAREST
    if precision in b.plans:
        details["weight_rounding"] = b.plans[precision].rounding
    if kept_float:
        details["kept_float"] = {
            "ops": kept_float,
            "why": "classifier head: its error lands directly on the logits"
            + ("; conv inputs chosen by the activation search (details.activation_search); int8 activations "
               "only at conv/linear inputs (residual adds, matmul/einsum, softmax, layer_norm, gelu, modulation "
               "mul stay fp16)" if precision == "w8a8" else " (weights fp16)"),
        }
    if precision in b.plans and b.plans[precision].search is not None:
        details["palette_search"] = b.plans[precision].search.report()
    if precision == "w8a8" and b.act_search is not None:
        details["activation_search"] = b.act_search.report()
    if calib:
        details["activation_calibration"] = calib
        details["activation_quantize_ops"] = details["ops_by_precision"].get("quantize", {}).get("int8", 0)
    extra: list[str] = []
    if precision in CLASSIFIER_PRECISIONS:
        cmodel = classifier_model(model, ctx.input_size, b.target, ctx.class_names)
        describe(cmodel, ctx, precision, b.form, b.target, True)
        cname = f"{ctx.stem}_{precision}_classifier.mlpackage"
        _save(cmodel, ctx.work_dir / cname)
        n = min(CLASSIFIER_CHECK_IMAGES, len(ctx.split.eval))
        labels = classify_package(ctx.work_dir / cname, ctx.split.eval.pixels[:n])
        names = classifier_labels(ctx.class_names)
        expected = [names[i] for i in logits[:n].argmax(1)]
        cbytes, csha = artifact_digest(ctx.work_dir / cname)
        details["classifier"] = {
            "path": cname,
            "bytes": cbytes,
            "sha256": csha,
            "outputs": ["classLabel", "classLabel_probs"],
            "labels": ("ImageNet-1k names; the two duplicated names carry their wnid" if ctx.imagenet_classes
                       else "the names of labels.txt; a repeated name carries its class index"),
            "checked_images": n,
            "label_agreement_with_logits_package": float(np.mean([a == e for a, e in zip(labels, expected)])) if n else None,
        }
        extra.append(cname)
    return ArtifactResult(
        precision=precision,
        path=name,
        input=TensorSpec(name="image", layout="image", dtype="image", shape=[1, 3, ctx.input_size, ctx.input_size],
                         mean=list(MEAN), std=list(STD), normalization="in_model"),
        output=TensorSpec(name="logits", layout="NC", dtype="float32", shape=[1, ctx.loaded.num_classes]),
        logits=logits,
        details=details,
        extra_files=extra,
    )


def convert(ctx: ConvertContext, precisions: list[str]) -> list[ArtifactResult | PrecisionFailure]:
    """Write one logits package per precision (plus classifier packages) and their interpreter logits."""
    import traceback

    opts = validate_options(ctx.options)
    target = opts["deployment_target"]
    deploy_target(target)
    form = opts["coreml_form"]
    float_ops = opts["coreml_float_ops"]
    float_head = opts["coreml_float_head"]
    builder = _Builder(ctx, form, target)
    out: list[ArtifactResult | PrecisionFailure] = []
    for precision in precisions:
        log.info("coreml: %s (%s form, %s)", precision, form, target)
        start = time.perf_counter()
        try:
            out.append(_one_precision(builder, precision, float_ops, float_head))
        except Exception as exc:  # one precision's failure must not stop the others
            log.debug("coreml %s failed:\n%s", precision, traceback.format_exc())
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            out.append(PrecisionFailure(precision, f"{type(exc).__name__}: {msg}", round(time.perf_counter() - start, 2)))
    return out
