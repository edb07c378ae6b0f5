"""Distil a trained-like EfficientMod from EfficientNet-Lite0, as an accuracy stand-in for a trained checkpoint.

Why: no trained EfficientMod checkpoint is reachable offline. The random proxies
(benchmarks/proxy_checkpoint.py) have near-tied logits and none of a trained
network's weight or activation statistics. A student trained to match a trained
ImageNet classifier's outputs (EfficientNet-Lite0, see benchmarks/trained_margins.py
for the weights) on real photos has trained weights, even if it is far less
accurate than the real release: its int8 noise and its logit margins are those of
a trained EfficientMod, which is what the int8 agreement bars depend on.

The sample folder holds one photo per class. The images at even positions of the
sorted file names are the training set, those at odd positions are held out: the
student never sees them, so agreement measured on them is agreement on unseen photos.

Steps:
  pack   (CPU)  python -m benchmarks.distill_proxy pack --calib-dir DIR --out PACK [--links LINKS]
                writes PACK/train/*.jpg (256x256 centre crops of the training images) and
                PACK/split.json; LINKS/train and LINKS/heldout are folders of links to the
                original files, for ``convert --calib-dir LINKS/train`` and ``evaluate --data LINKS/heldout``.
  train  (GPU)  python -m benchmarks.distill_proxy train --pack PACK --lite0 PTH --out DIR [--seconds 330]
                KL(teacher || student) on random resized crops, flips, colour and mixup, the
                teacher seeing the same view; AdamW, warm-up then cosine over the time budget.
                Writes DIR/student_*.pt (shards under 16 MiB) and DIR/train_log.json.
  merge  (CPU)  python -m benchmarks.distill_proxy merge DIR OUT.pth --model efficientmod_xxs
                joins the shards and loads the result strictly, as convert will.
  check  (CPU)  python -m benchmarks.distill_proxy check --data LINKS/heldout --lite0 PTH --model M --weights OUT.pth
                [--sqnr 29.0 ...]  what kind of stand-in the student is on a photo folder: its and the
                teacher's top-1, their agreement, the student's logit margins (the SQNR 99 % agreement
                needs), and the agreement its margins keep at each --sqnr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from benchmarks.trained_margins import Lite0, lite0_input, load_lite0_state, margins
from calibration.folder import scan_folder
from calibration.preprocess import MEAN, STD, resize_and_crop
from calibration.source import resolve_image_dir
from calibration.splits import load_items
from edge.checks import compare_logits, noise_limited_agreement, sqnr_for_agreement
from edge.context import torch_logits
from edge.efficientmod import create_model
from edge.errors import EffmodError
from edge.weights import load_model

PACK_SIZE = 256  # side of the stored training crops
SHARD_BYTES = 15 * 2**20  # the device returns files of at most 16 MiB


def split_names(names: list[str]) -> tuple[list[str], list[str]]:
    """Training and held-out file names: even and odd positions of the sorted names."""
    ordered = sorted(names)
    return ordered[0::2], ordered[1::2]


def pack(calib_dir: str | None, out: Path, links: Path | None) -> dict:
    """Write the training crops and split.json (see module docstring); return the split."""
    folder = scan_folder(resolve_image_dir(calib_dir))
    by_name = {item.path.name: item.path for item in folder.items}
    train, heldout = split_names(list(by_name))
    (out / "train").mkdir(parents=True, exist_ok=True)
    for name in train:
        with Image.open(by_name[name]) as img:  # the evaluation preprocessing, cropped at 256 instead of 224
            resize_and_crop(img, PACK_SIZE, PACK_SIZE).save(out / "train" / f"{name}.jpg", quality=92)
    split = {"root": str(folder.root), "rule": "sorted file names: even positions train, odd positions held out",
             "train": train, "heldout": heldout}
    (out / "split.json").write_text(json.dumps(split, indent=1))
    if links is not None:
        for part, names in (("train", train), ("heldout", heldout)):
            (links / part).mkdir(parents=True, exist_ok=True)
            for name in names:
                link = links / part / name
                if not link.exists():
                    link.symlink_to(by_name[name].resolve())
    return split


def load_pack(pack_dir: Path) -> torch.Tensor:
    """The training crops as uint8 NCHW."""
    files = sorted((pack_dir / "train").glob("*.jpg"))
    if not files:
        raise EffmodError(f"{pack_dir}/train holds no .jpg crops; run this script's 'pack' step first")
    arrays = []
    for f in files:
        with Image.open(f) as img:
            arrays.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def random_views(images: torch.Tensor, res: int, g: torch.Generator, scale: tuple[float, float] = (0.1, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """Random resized crops (area fraction in ``scale``, aspect in ``ratio``) with horizontal flips,
    of uint8 NCHW ``images``, as float NCHW in [0, 1] at ``res`` x ``res``."""
    n, dev = images.shape[0], images.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=g, device=dev) * (hi - lo) + lo

    area = uniform(*scale)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    w, h = torch.sqrt(area * aspect).clamp(max=1.0), torch.sqrt(area / aspect).clamp(max=1.0)
    sign = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=dev)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1] = w * sign, h
    theta[:, 0, 2], theta[:, 1, 2] = uniform(-1, 1) * (1 - w), uniform(-1, 1) * (1 - h)
    grid = F.affine_grid(theta, [n, 3, res, res], align_corners=False)
    return F.grid_sample(images.float() / 255.0, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def jitter(x: torch.Tensor, g: torch.Generator, strength: float = 0.3) -> torch.Tensor:
    """Per-image brightness and contrast in [1 - strength, 1 + strength], clamped to [0, 1]."""
    n = x.shape[0]
    b = 1 + (torch.rand(n, 1, 1, 1, generator=g, device=x.device) * 2 - 1) * strength
    c = 1 + (torch.rand(n, 1, 1, 1, generator=g, device=x.device) * 2 - 1) * strength
    mean = x.mean((1, 2, 3), keepdim=True)
    return (((x - mean) * c + mean) * b).clamp(0, 1)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at temperature 1, mean over the batch."""
    return F.kl_div(F.log_softmax(student_logits.float(), 1), F.log_softmax(teacher_logits.float(), 1),
                    log_target=True, reduction="batchmean")


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]  # biases, norms, LayerScale
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def save_shards(state: dict[str, torch.Tensor], out: Path) -> list[Path]:
    """Write ``state`` as student_NN.pt files of at most SHARD_BYTES of tensor data each."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][key] = value.detach().cpu().clone()
        size += nbytes
    paths = []
    for i, shard in enumerate(shards):
        path = out / f"student_{i:02d}.pt"
        torch.save(shard, path)
        paths.append(path)
    return paths


def train(args: argparse.Namespace) -> dict:
    """Distil (see module docstring); returns the training log."""
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    g = torch.Generator(device=dev).manual_seed(args.seed)
    images = load_pack(args.pack).to(dev)
    teacher = Lite0(load_lite0_state(args.lite0)).to(dev).eval()
    student = create_model(args.model, seed=args.seed).to(dev).train()
    opt = torch.optim.AdamW(_param_groups(student, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    mean = torch.tensor(MEAN, device=dev).reshape(1, 3, 1, 1)
    std = torch.tensor(STD, device=dev).reshape(1, 3, 1, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    log: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "device": str(dev),
                 "train_images": int(images.shape[0]), "history": []}
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    start = last_save = time.time()
    step, seen = 0, 0
    while (elapsed := time.time() - start) < args.seconds and step < args.max_steps:
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * elapsed / args.seconds))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(images.shape[0], (args.batch,), generator=g, device=dev)
        x = jitter(random_views(images[idx], args.res, g), g)
        if torch.rand(1, generator=g, device=dev).item() < args.mixup:
            lam = torch.rand(1, generator=g, device=dev)  # Beta(1, 1), mixup's usual weight
            x = lam * x + (1 - lam) * x.flip(0)
        with amp:
            with torch.no_grad():
                t = teacher((x * 255.0 - 127.0) / 128.0)
            s = student((x - mean) / std)
        loss = distill_loss(s, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.clip)
        opt.step()
        step, seen = step + 1, seen + args.batch
        if step % args.log_every == 0:
            agree = float((s.argmax(1) == t.argmax(1)).float().mean())
            entry = {"step": step, "seconds": round(time.time() - start, 1), "lr": lr, "loss": float(loss.detach()),
                     "batch_top1_agreement": agree, "images_per_s": round(seen / (time.time() - start), 1)}
            log["history"].append(entry)
            print(json.dumps(entry), flush=True)
        if time.time() - last_save > args.save_every:
            save_shards(student.state_dict(), args.out)
            last_save = time.time()
    student.eval()
    with torch.no_grad(), amp:
        off = (PACK_SIZE - 224) // 2
        views = images[:, :, off : off + 224, off : off + 224].float() / 255.0  # centre crops, as evaluation
        agree = float((student((views - mean) / std).argmax(1) == teacher((views * 255.0 - 127.0) / 128.0)
                       .argmax(1)).float().mean())
    log.update({"steps": step, "images_seen": seen, "seconds": round(time.time() - start, 1),
                "train_crops_top1_agreement_with_teacher": agree,
                "shards": [p.name for p in save_shards(student.state_dict(), args.out)]})
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def merge(shard_dir: Path, out: Path, model: str) -> None:
    """Join student_*.pt shards into ``out`` and load it strictly as ``model``."""
    files = sorted(shard_dir.glob("student_*.pt"))
    if not files:
        raise EffmodError(f"{shard_dir} holds no student_*.pt shards; run this script's 'train' step first")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    torch.save(state, out)
    load_model(model, out)


def check(data: Path, lite0: Path, model: str, weights: Path, sqnrs: tuple[float, ...] = ()) -> list[str]:
    """Lines describing the student against its teacher on the photos in ``data`` (see module docstring)."""
    batch = load_items(scan_folder(data, flag="--data").items)
    teacher = torch_logits(Lite0(load_lite0_state(lite0)).eval(),
                           lite0_input(batch.pixels).numpy())
    student = torch_logits(load_model(model, weights).model, batch.nchw())
    vs_teacher = compare_logits(teacher, student)
    lines = [f"{len(batch)} photos from {data}"]
    for name, logits in (("EfficientNet-Lite0 (teacher)", teacher), (f"{model} (student)", student)):
        top1 = float(np.mean(logits.argmax(1) == batch.labels))
        lines.append(f"{name}: top-1 {100 * top1:.1f} % against the labels; logit rms "
                     f"{float(np.sqrt(np.mean(logits**2))):.2f}; {margins(logits)}; "
                     f"99 % agreement needs {sqnr_for_agreement(logits, 0.99):.1f} dB by the near-tie model")
    lines.append(f"student vs teacher: top-1 agreement {100 * vs_teacher['top1_agreement']:.1f} %, "
                 f"logit SQNR {vs_teacher['sqnr_db']:.1f} dB")
    lines += [f"at {db:.1f} dB the student's margins keep {100 * noise_limited_agreement(student, db):.1f} % "
              "agreement by the near-tie model" for db in sqnrs]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--calib-dir")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--links", type=Path)
    t = sub.add_parser("train")
    t.add_argument("--pack", type=Path, required=True)
    t.add_argument("--lite0", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--model", default="efficientmod_xxs")
    t.add_argument("--seconds", type=float, default=330.0)
    t.add_argument("--max-steps", type=int, default=10**9)
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--res", type=int, default=224)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--mixup", type=float, default=0.5, help="share of batches mixed with their reverse")
    t.add_argument("--clip", type=float, default=5.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--save-every", type=float, default=90.0)
    t.add_argument("--device")
    m = sub.add_parser("merge")
    m.add_argument("shards", type=Path)
    m.add_argument("out", type=Path)
    m.add_argument("--model", default="efficientmod_xxs")
    c = sub.add_parser("check")
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--lite0", type=Path, required=True)
    c.add_argument("--model", default="efficientmod_xxs")
    c.add_argument("--weights", type=Path, required=True)
    c.add_argument("--sqnr", type=float, nargs="*", default=[])
    args = ap.parse_args()
    try:
        if args.step == "pack":
            split = pack(args.calib_dir, args.out, args.links)
            print(f"{len(split['train'])} training crops in {args.out / 'train'}, {len(split['heldout'])} held out")
        elif args.step == "train":
            log = train(args)
            print(f"{log['steps']} steps, {log['images_seen']} views in {log['seconds']} s; training crops' "
                  f"top-1 agreement with the teacher {100 * log['train_crops_top1_agreement_with_teacher']:.1f} %")
        elif args.step == "merge":
            merge(args.shards, args.out, args.model)
            print(f"wrote {args.out}")
        else:
            print("\n".join(check(args.data, args.lite0, args.model, args.weights, tuple(args.sqnr))))
    except (EffmodError, OSError) as exc:  # OSError: an unwritable --out, a file gone mid-run
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
