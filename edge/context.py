"""What a converter receives and returns."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from calibration.imagenet import class_names
from calibration.splits import Split
from edge.efficientmod import EfficientModDeploy
from edge.manifest import TensorSpec
from edge.weights import LoadedModel

log = logging.getLogger("effmod_edge")


@dataclass
class ConvertContext:
    loaded: LoadedModel
    deploy: EfficientModDeploy
    split: Split
    reference: np.ndarray  # PyTorch fp32 logits on split.eval
    work_dir: Path
    seed: int = 0
    input_size: int = 224
    options: dict = field(default_factory=dict)
    class_names: list[str] = field(default_factory=class_names)  # labels.txt, in class-index order
    imagenet_classes: bool = True  # False: a fine-tune's own classes (the images' ImageNet labels do not apply)

    @property
    def stem(self) -> str:
        return self.loaded.variant


@dataclass
class ArtifactResult:
    """A converted file (path relative to the work dir) and its logits on the eval split."""

    precision: str
    path: str
    input: TensorSpec
    output: TensorSpec
    logits: np.ndarray
    details: dict = field(default_factory=dict)
    extra_files: list[str] = field(default_factory=list)


@dataclass
class PrecisionFailure:
    precision: str
    error: str
    seconds: float | None = None  # this precision's own time (None: the target's whole time is recorded)
    path: str | None = None  # the file that failed, where the precision builds several


def torch_logits(model: torch.nn.Module, images_nchw: np.ndarray, batch: int = 32) -> np.ndarray:
    """Logits of a PyTorch model on normalized NCHW float32 images."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images_nchw), batch):
            out.append(model(torch.from_numpy(images_nchw[i : i + batch])).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1000), np.float32)
