"""ONNX target: the deploy form exported with opset 17, checked with onnxruntime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from calibration.preprocess import MEAN, STD
from edge.context import ArtifactResult, ConvertContext, log
from edge.manifest import TensorSpec

OPSET = 17


def export_onnx(
    model: torch.nn.Module, path: Path, input_size: int = 224, dynamic_batch: bool = False, opset: int = OPSET
) -> Path:
    """Export ``model`` (NCHW float32 in, logits out) to ``path``."""
    x = torch.zeros(1, 3, input_size, input_size)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (x,), str(path), input_names=["input"], output_names=["logits"],
            opset_version=opset, dynamic_axes=axes, dynamo=False, do_constant_folding=True,
        )
    return path


def onnx_logits(path: Path, images_nchw: np.ndarray, batch: int = 1, threads: int = 0) -> np.ndarray:
    """Run an ONNX file with onnxruntime (CPU) over normalized NCHW images."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = [sess.run(None, {"input": images_nchw[i : i + batch]})[0] for i in range(0, len(images_nchw), batch)]
    return np.concatenate(out).astype(np.float32)


def io_specs(input_size: int, batch: int | None, num_classes: int = 1000) -> tuple[TensorSpec, TensorSpec]:
    return (
        TensorSpec("input", "NCHW", "float32", [batch, 3, input_size, input_size], list(MEAN), list(STD),
                   normalization="app"),
        TensorSpec("logits", "NC", "float32", [batch, num_classes]),
    )


def convert(ctx: ConvertContext, precisions: list[str]) -> list[ArtifactResult]:
    """Write the batch-1 and dynamic-batch fp32 ONNX files and their logits."""
    images = ctx.split.eval.nchw()
    results = []
    for dynamic in (False, True):
        name = f"{ctx.stem}{'_dynamic' if dynamic else ''}.onnx"
        log.info("onnx: exporting %s", name)
        export_onnx(ctx.deploy, ctx.work_dir / name, ctx.input_size, dynamic_batch=dynamic)
        logits = onnx_logits(ctx.work_dir / name, images, batch=16 if dynamic else 1)
        inp, out = io_specs(ctx.input_size, None if dynamic else 1, ctx.loaded.num_classes)
        results.append(
            ArtifactResult("fp32", name, inp, out, logits, {"opset": OPSET, "batch": "dynamic" if dynamic else 1})
        )
    return results
