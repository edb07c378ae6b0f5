"""Loading EfficientMod weights: strict, with one-line errors that name the fix."""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from edge.efficientmod import (
    CHECKPOINT_WRAPPER_KEYS,
    EfficientMod,
    PUBLIC_VARIANTS,
    VARIANTS,
    checkpoint_filter_fn,
    create_model,
    unwrap_state_dict,
    detect_variant,
    get_config,
    head_classes,
    match_variant,
    with_classes,
)
from edge.errors import CheckpointError

DEFAULT_MODEL = "efficientmod_xxs"
log = logging.getLogger("effmod_edge")


@dataclass
class LoadedModel:
    model: EfficientMod
    variant: str
    weights: str  # checkpoint path, or "untrained"
    weights_sha256: str | None

    @property
    def untrained(self) -> bool:
        return self.weights == "untrained"

    @property
    def num_classes(self) -> int:
        return self.model.cfg.num_classes


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


EXPORTED_SUFFIXES = (".onnx", ".tflite", ".mlpackage", ".mlmodel")


def _unreadable_message(path: Path, exc: Exception) -> str:
    """Why torch.load refused ``path``, told apart for the files people pass by mistake."""
    text = str(exc)
    fix = "; re-save the weights alone with torch.save(model.state_dict(), 'ckpt.pth')"
    if "TorchScript" in text:
        return f"{path} is a TorchScript archive (torch.jit.save), which holds code as well as weights{fix}"
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"{path} pickles a {found.group(1)} object, not only tensors, and is not loaded for safety "
                f"(it could run code){fix}")
    detail = text.strip().splitlines()[0].split(". ")[0][:160] if text.strip() else ""
    reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return f"could not read checkpoint {path}: {reason}; the file is truncated or not a PyTorch checkpoint, download it again"


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict inside a checkpoint file, keys normalized to the release names."""
    path = Path(path).expanduser()
    if path.suffix.lower() in EXPORTED_SUFFIXES and path.exists():
        raise CheckpointError(f"{path} is an exported model, not a checkpoint; pass the PyTorch .pth (or .safetensors) "
                              f"it came from")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} not found; pass --weights with the path to an EfficientMod .pth file"
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript archive")  # refused below, by name
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for damaged files
        raise CheckpointError(_unreadable_message(path, exc)) from None
    state = checkpoint_filter_fn(obj) if isinstance(obj, dict) else {}
    holders = [k for k in CHECKPOINT_WRAPPER_KEYS  # the wrapper keys holding tensor dicts, in the order tried
               if isinstance(obj, dict) and isinstance(obj.get(k), dict) and unwrap_state_dict(obj[k]) is obj[k]]
    if state and len(holders) > 1:
        log.warning("%s holds weights under %s; converting %r, as upstream's validate.py does without --use-ema "
                    "(to convert %r, save it alone: torch.save(ckpt[%r], 'other.pth'))",
                    path.name, ", ".join(repr(k) for k in holders), holders[0], holders[1], holders[1])
    if not state:
        dicts = [obj, *(obj.get(k) for k in CHECKPOINT_WRAPPER_KEYS)] if isinstance(obj, dict) else []
        for d in (d for d in dicts if isinstance(d, dict)):
            odd = [k for k, v in d.items() if not isinstance(v, torch.Tensor)]
            if 0 < len(odd) < len(d):
                raise CheckpointError(
                    f"{path} mixes weights with other values ({odd[0]!r} is a {type(d[odd[0]]).__name__}"
                    f"{f' and {len(odd) - 1} more' if len(odd) > 1 else ''}); save the model's state_dict() alone")
        keys = ", ".join(list(obj)[:5]) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path} holds no model weights (found: {keys or 'nothing'}); pass an EfficientMod "
            "checkpoint (a state_dict, or a dict with 'state_dict', 'state_dict_ema' or 'model')"
        )
    return state


def _mismatch_message(path: Path, wanted: str, state: dict[str, torch.Tensor]) -> str:
    m = match_variant(state, wanted)
    parts = []
    if m.missing:
        parts.append(f"{len(m.missing)} missing keys (e.g. {m.missing[0]})")
    if m.unexpected:
        parts.append(f"{len(m.unexpected)} unexpected keys (e.g. {m.unexpected[0]})")
    if m.mismatched:
        parts.append(f"{len(m.mismatched)} shape mismatches (e.g. {m.mismatched[0]})")
    actual = detect_variant(state)
    hint = (
        f"it matches {actual}: use --model {actual} or omit --model"
        if actual
        else "it matches no EfficientMod variant (" + ", ".join(PUBLIC_VARIANTS) + ")"
    )
    return f"checkpoint {path} does not fit {wanted}: {', '.join(parts)}; {hint}"


def load_model(model: str | None = None, weights: str | Path | None = None, seed: int = 0) -> LoadedModel:
    """Build ``model`` and load ``weights`` strictly; detect the variant when model is None.

    Without weights the model is randomly initialised (deterministic for ``seed``)
    and a warning says so.
    """
    if weights is None:
        name = get_config(model or DEFAULT_MODEL).name
        log.warning(
            "WARNING: no --weights given: %s is RANDOMLY INITIALISED; its outputs are meaningless "
            "and the manifest records weights='untrained'",
            name,
        )
        return LoadedModel(create_model(name, seed), name, "untrained", None)
    path = Path(weights).expanduser()
    state = read_checkpoint(path)
    if model is None:
        name = detect_variant(state)
        if name is None:
            closest = min(
                VARIANTS,
                key=lambda v: len(match_variant(state, v).missing) + len(match_variant(state, v).unexpected),
            )
            raise CheckpointError(_mismatch_message(path, closest, state) + "; is this an EfficientMod checkpoint?")
    else:
        name = get_config(model).name
        if not match_variant(state, name).exact:
            raise CheckpointError(_mismatch_message(path, name, state))
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} has NaN or infinite values in {len(bad)} tensor(s) (e.g. {bad[0]}); "
                              f"the training run diverged or the file is damaged: pass a checkpoint from before that")
    classes = head_classes(state)
    if classes != get_config(name).num_classes:
        log.info("checkpoint %s has a head of %d classes (a fine-tune), not ImageNet-1k's %d",
                 path.name, classes, get_config(name).num_classes)
    net = EfficientMod(with_classes(get_config(name), classes))
    wanted = net.state_dict()
    ints = [k for k, v in state.items() if wanted[k].is_floating_point() and not v.is_floating_point()]
    if ints:  # load_state_dict would cast them: e.g. a quantized export's int8 levels, read as weights
        raise CheckpointError(f"checkpoint {path} holds {state[ints[0]].dtype} values where {name} has float weights, "
                              f"in {len(ints)} tensor(s) (e.g. {ints[0]}); is it a quantized export? pass the float "
                              f"checkpoint it was exported from")
    net.load_state_dict(state, strict=True)
    return LoadedModel(net.eval(), name, str(path.resolve()), file_sha256(path))
