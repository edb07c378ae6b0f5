"""Checkpoint loading: wrappers, prefixes, variant detection, one-line errors."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

from edge.efficientmod import checkpoint_filter_fn, create_model
from edge.errors import CheckpointError
from edge.weights import file_sha256, load_model, read_checkpoint


@pytest.fixture(scope="module")
def xxs():
    return create_model("efficientmod_xxs", seed=7)


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "state_dict_ema", "ddp_model", "compiled", "lightning",
                                  "lightning_compiled"])
def test_wrappers_load_strictly_and_detect_variant(tmp_path, xxs, wrap):
    sd = xxs.state_dict()
    obj = {
        "bare": sd,
        "state_dict": {"state_dict": sd, "epoch": 3, "args": argparse.Namespace(lr=1e-3)},
        "state_dict_ema": {"state_dict_ema": sd},
        "ddp_model": {"model": {"module." + k: v for k, v in sd.items()}},
        "compiled": {"_orig_mod.module." + k: v for k, v in sd.items()},
        "lightning": {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3},
        "lightning_compiled": {"state_dict": {"model._orig_mod." + k: v for k, v in sd.items()}},
    }[wrap]
    path = tmp_path / f"{wrap}.pth"
    torch.save(obj, path)
    loaded = load_model(None, path)
    assert loaded.variant == "efficientmod_xxs", loaded.variant
    assert loaded.weights_sha256 == file_sha256(path), "recorded sha256 is not the checkpoint file's"
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), xxs(x)), f"{wrap}: loaded model's logits differ from the source model's"


def test_filter_is_pure(xxs):
    src = {"model": {"module." + k: v for k, v in xxs.state_dict().items()}}
    keys = list(src["model"])
    out = checkpoint_filter_fn(src)
    assert list(src["model"]) == keys, "input dict was modified"
    assert set(out) == set(xxs.state_dict())


def _one_line_error(path, model=None) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(model, path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_wrong_variant_names_counts_and_match(tmp_path, xxs):
    p = tmp_path / "xxs.pth"
    torch.save({"state_dict": xxs.state_dict()}, p)
    msg = _one_line_error(p, "efficientmod_s")
    assert "missing keys" in msg and "unexpected keys" in msg and "it matches efficientmod_xxs" in msg


def test_truncated_text_and_empty_files(tmp_path, xxs):
    full = tmp_path / "full.pth"
    torch.save(xxs.state_dict(), full)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[:4000])
    msg = _one_line_error(cut)
    assert "truncated or not a PyTorch checkpoint" in msg and "internal miniz error" not in msg, msg
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    assert "could not read checkpoint" in _one_line_error(text)
    nothing = tmp_path / "nothing.pth"
    torch.save({"epoch": 1}, nothing)
    assert "holds no model weights" in _one_line_error(nothing)
    assert "not found" in _one_line_error(tmp_path / "absent.pth")


def test_partial_checkpoint_matches_no_variant(tmp_path, xxs):
    sd = dict(xxs.state_dict())
    sd.pop("head.weight")
    p = tmp_path / "partial.pth"
    torch.save(sd, p)
    msg = _one_line_error(p)
    assert "1 missing keys (e.g. head.weight)" in msg and "matches no EfficientMod variant" in msg


def test_no_weights_is_untrained_and_deterministic():
    a = load_model("efficientmod_test_tiny", None, seed=3)
    b = load_model("efficientmod_test_tiny", None, seed=3)
    assert a.untrained and a.weights == "untrained" and a.weights_sha256 is None
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    c = load_model("efficientmod_test_tiny", None, seed=4)
    differ = [k for k, v in a.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, c.model.state_dict()[k])]
    assert differ, "seed 3 and seed 4 gave the same untrained weights: the seed is ignored"


def test_non_finite_weights_are_refused_by_name(tmp_path):
    sd = create_model("efficientmod_test_tiny", seed=0).state_dict()
    name = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)
    sd[name] = sd[name].clone()
    sd[name].view(-1)[1] = float("nan")
    ckpt = tmp_path / "diverged.pth"
    torch.save(sd, ckpt)
    with pytest.raises(CheckpointError, match=rf"NaN or infinite values in 1 tensor\(s\) \(e.g. {name}\)"):
        load_model("efficientmod_test_tiny", ckpt)


def test_integer_weights_are_refused_not_cast(tmp_path):
    sd = create_model("efficientmod_test_tiny", seed=0).state_dict()
    names = [k for k, v in sd.items() if v.is_floating_point() and v.dim() == 4][:2]
    for name in names:  # a quantized export's int8 levels: cast to float they would make a model that checks "fine"
        sd[name] = (sd[name] / sd[name].abs().max() * 127).round().to(torch.int8)
    ckpt = tmp_path / "int8_export.pth"
    torch.save(sd, ckpt)
    with pytest.raises(CheckpointError, match=rf"holds torch.int8 values where efficientmod_test_tiny has float weights, "
                                              rf"in 2 tensor\(s\) \(e.g. {names[0]}\)"):
        load_model("efficientmod_test_tiny", ckpt)
    sd = create_model("efficientmod_test_tiny", seed=0).state_dict()
    for dtype in (torch.float16, torch.bfloat16):  # half-precision checkpoints are fine: cast up losslessly
        half = {k: v.to(dtype) for k, v in sd.items()}
        torch.save(half, tmp_path / "half.pth")
        got = load_model("efficientmod_test_tiny", tmp_path / "half.pth").model.state_dict()
        worst = max(float((got[k] - half[k].float()).abs().max()) for k in half)
        assert worst == 0.0, f"a {dtype} checkpoint must load exactly (max |diff| {worst})"


def test_safetensors_checkpoint_loads_like_the_pth(tmp_path, xxs):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in xxs.state_dict().items()}
    st = tmp_path / "model.safetensors"
    save_file(sd, str(st))
    loaded = load_model(None, st)
    assert loaded.variant == "efficientmod_xxs"
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((loaded.model(x) - xxs.eval()(x)).abs().max())
    assert diff == 0.0, f"safetensors weights give other logits than the model they came from: max|d| {diff}"


def test_files_people_pass_by_mistake_are_named(tmp_path, xxs):
    whole = tmp_path / "whole.pth"
    torch.save(xxs, whole)
    msg = _one_line_error(whole)
    assert "pickles a edge.efficientmod.EfficientMod object" in msg and "torch.save(model.state_dict()" in msg, msg
    script = tmp_path / "script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated; users still have such files
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(script))
    assert "is a TorchScript archive" in _one_line_error(script)
    exported = tmp_path / "model.onnx"
    exported.write_bytes(b"\x08\x07\x12\x07pytorch")
    assert "is an exported model, not a checkpoint" in _one_line_error(exported)


def test_weights_mixed_with_other_values_are_named(tmp_path, xxs):
    sd = dict(xxs.state_dict())
    sd["n_averaged"] = 3
    mixed = tmp_path / "mixed.pth"
    torch.save({"state_dict": sd}, mixed)
    assert "mixes weights with other values ('n_averaged' is a int)" in _one_line_error(mixed)


def test_a_file_with_raw_and_ema_weights_says_which_converts(tmp_path, caplog):
    import logging

    model = create_model("efficientmod_test_tiny", seed=0)
    both = tmp_path / "both.pth"
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": model.state_dict(), "epoch": 3}, both)
    other = tmp_path / "other.pth"  # a 'model' entry that is not weights must not be named
    torch.save({"model": {"arch": "efficientmod_test_tiny"}, "state_dict": model.state_dict()}, other)
    with caplog.at_level(logging.WARNING, logger="effmod_edge"):
        read_checkpoint(both)
        read_checkpoint(other)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "converting 'state_dict'" in warnings[0] and "'state_dict_ema'" in warnings[0], \
        warnings
