"""Train a method's model briefly on the synthetic tiny-object set, on the CPU, and write its checkpoint
in the upstream layout: models whose AP means something, to measure precision and backends on.

A tool, not a user command. Each run:

1. writes (once, into the cache) a training and a held-out synthetic set (``make-dataset synthetic``:
   objects of 2-64 px on photo crops, one class) at the model's input size;
2. builds the method's *training form* (``build_training_model``: teacher, decoder, imitation head
   included) with one class, or resumes it from the cache's checkpoint (``--resume``), read back through
   the same loader a user's checkpoint goes through;
3. optimizes the method's own training losses (``training_losses``) for ``--minutes``, printing the
   loss curve; SGD with warm-up for the mmdet-style detectors, AdamW for Deformable-DETR (as their
   trainers do), random horizontal flips. Nothing pretrained is available here, so the whole network
   trains as mmdet's from-scratch configs train it (``learn_from_scratch``), and FCOS's distances start
   at one stride (``prime_box_regression``). ThumbDet takes Deformable-DETR's parameter groups (backbone,
   sampling offsets and reference points at a tenth of the lr) and, with ``--backbone-from cfinet``, starts
   its ResNet-50 from that model's trained one (``seed_backbone``), as upstream starts from ImageNet's;
4. writes ``<cache>/<model>.pth`` as the upstream trainer would: mmcv 1.x ``save_checkpoint``
   (``meta`` with ``CLASSES``, ``state_dict``, ``optimizer``) for CFINet, BH and DFR-Det, mmengine's
   for SR-TOD (``meta.dataset_meta``, ``state_dict``, ``optimizer``, ``message_hub``), Deformable-DETR's
   ``main.py`` for ThumbDet (``model`` = the student, ``optimizer``, ``lr_scheduler``, ``epoch``, ``args``),
   plus ``<model>.log.json`` (loss curve, AP per evaluation);
5. exports the checkpoint (``tod-deploy export --checkpoint``'s code, parity check included) and evaluates
   the export on the held-out set on torch and onnxruntime (``tod-deploy eval``'s code): AP, AP50, bins.

The same checkpoint then exports with ``tod-deploy export --checkpoint <cache>/<model>.pth`` and
``tod-deploy eval`` shows real AP per backend; benchmarks/precision_fidelity.py takes ``--checkpoints <cache>``
and exports each with the settings above (a checkpoint exports only with the settings it was trained with).

The default input is 128x128 (ThumbDet: 256x256, the least its recipe takes): the objects keep their
2-64 px (the set is drawn at the model's input size), and a step costs a quarter of one at 256x256. A
convolutional detector trained at 128x128 runs at any size, so the checkpoints are measured at 512x512 by
benchmarks/precision_fidelity.py.

Usage: python benchmarks/train_synthetic.py --model bh [--minutes 20] [--size 128x128] [--resume]
                                            [--images 400] [--val 50] [--batch 4] [--lr X] [--cache DIR]
                                            [--backbone-from cfinet] (ThumbDet)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tod_deploy.checkpoints import read_checkpoint
from tod_deploy.errors import UserError
from tod_deploy.evaluation.datasets import load_coco, load_image
from tod_deploy.evaluation.run import evaluate_model
from tod_deploy.evaluation.synthetic import ANNOTATIONS, IMAGES, generate_synthetic
from tod_deploy.export.pipeline import export_model
from tod_deploy.models import build_training_model
from tod_deploy.nn.heads.fcos import FCOSHead
from tod_deploy.recipes import load_recipe, parse_input_size

# name -> (method, recipe overrides, optimizer, base lr); the trainers' own choices (BH FCOS measured at batch 4)
MODELS: dict[str, tuple[str, dict[str, Any], str, float]] = {
    # No trained teacher exists here (the paper distils from a pretrained full-size Deformable-DETR): off.
    "thumbdet": ("thumbdet", {"model": {"kd_logit_weight": 0.0, "kd_feature_weight": 0.0}}, "adamw", 2e-4),
    "sr_tod": ("sr_tod", {"model": {"detector": "faster_rcnn"}}, "sgd", 0.01),
    "bh": ("bh", {"model": {"backbone": "bh_hrnet18", "detector": "fcos"}}, "sgd", 0.01),
    "bh_frcnn": ("bh", {"model": {"backbone": "bh_resnet50", "detector": "faster_rcnn"}}, "sgd", 0.01),
    # stage 0's loss weighed as at a 384x384 input (crpn_losses): 10x upstream's 1216x1216, 1/9 of 128x128's own.
    # 20 min at 2 threads, held-out AP50: 1216 28.7 (stage 0 barely learns), 384 36.4, 256 1.5 (it dominates the clip)
    "cfinet": ("cfinet", {"model": {"stage0_average_hw": [384, 384]}}, "sgd", 0.01),
    "dfr_det": ("dfr_det", {"model": {"detector": "fcos"}}, "adamw", 1e-3),
}
CLASSES = ("object",)  # the synthetic set's one category
# Gradient-norm clip: mmdet's grad_clip for detectors trained from scratch; Deformable-DETR's main.py --clip_max_norm
CLIP_MAX_NORM = {"thumbdet": 0.1}
DEFAULT_CLIP_MAX_NORM = 35.0
WARMUP_STEPS = 100
DEFAULT_SIDE = 128  # px, raised to a recipe's min_size (see the module's docstring)
TRAIN_SEED, VAL_SEED = 1, 2  # make-dataset seeds of the training and held-out sets
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tod-deploy" / "train_synthetic"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def synthetic_split(root: Path, images: int, seed: int, size_hw: tuple[int, int]) -> Path:
    """A synthetic set at the model's input size, made once (same seed, same bytes). A set already there
    must be the one asked for: a reused folder would otherwise measure on another set, silently. The set is
    made aside and moved into place whole, so two runs started together (one model each) do not write into
    one folder: the second to finish keeps the first's set, which it then checks as any set already there."""
    if not (root / ANNOTATIONS).is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{root.name}-", dir=root.parent) as staging:
            made_aside = Path(staging) / root.name
            generate_synthetic(made_aside, images=images, seed=seed, size_hw=size_hw)
            with contextlib.suppress(OSError):  # another run's set is there by now
                made_aside.rename(root)
    if not (root / ANNOTATIONS).is_file():
        raise SystemExit(f"{root} holds no {ANNOTATIONS} (a run stopped while writing it): remove the folder")
    coco = json.loads((root / ANNOTATIONS).read_text())
    made = (len(coco["images"]), coco["info"]["seed"], tuple(coco["info"]["size"]))
    if made != (images, seed, tuple(size_hw)):
        raise SystemExit(f"{root} holds {made[0]} images of seed {made[1]} at {made[2][0]}x{made[2][1]}, not "
                         f"{images} of seed {seed} at {size_hw[0]}x{size_hw[1]}: remove it or use another folder")
    return root


def load_split(root: Path, size_hw: tuple[int, int], normalized_cxcywh: bool) -> list[tuple[torch.Tensor, dict]]:
    """(image [3, H, W] 0..255, target) pairs; targets as the method's loss reads them (pixels xyxy,
    or Deformable-DETR's normalized cx, cy, w, h)."""
    coco = load_coco(root / ANNOTATIONS, root / IMAGES)
    per_image: dict[int, list[list[float]]] = {}
    for ann in coco.subset()["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    samples = []
    for image in coco.images:
        pixels, mapping = load_image(coco.image_path(image), size_hw)
        scale = np.array([mapping.scale_x, mapping.scale_y] * 2, dtype=np.float32)
        xywh = np.asarray(per_image.get(image["id"], []), dtype=np.float32).reshape(-1, 4) * scale
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        samples.append((torch.from_numpy(pixels), boxes))
    h, w = size_hw
    out = []
    for pixels, boxes in samples:
        if normalized_cxcywh:
            cxcywh = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], axis=1)
            boxes = cxcywh / np.array([w, h, w, h], dtype=np.float32)
        out.append((pixels, {"boxes": torch.from_numpy(boxes), "labels": torch.zeros(len(boxes), dtype=torch.int64)}))
    return out


def flipped(pixels: torch.Tensor, target: dict, normalized_cxcywh: bool) -> tuple[torch.Tensor, dict]:
    boxes = target["boxes"].clone()
    width = 1.0 if normalized_cxcywh else float(pixels.shape[-1])
    if normalized_cxcywh:
        boxes[:, 0] = width - boxes[:, 0]
    else:
        boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
    return pixels.flip(-1), {"boxes": boxes, "labels": target["labels"]}


def save_checkpoint(path: Path, name: str, model: Any, optimizer: Any, step: int, args: argparse.Namespace) -> None:
    """The checkpoint as the method's upstream trainer writes it (see the module docstring)."""
    method = MODELS[name][0]
    tmp = path.with_name(f".{path.name}.partial")
    # Deformable-DETR's main.py saves the model it trains (the student); mmdet trainers the whole detector.
    state = {k: v.detach().clone() for k, v in (model.student if method == "thumbdet" else model).state_dict().items()}
    if method == "thumbdet":
        upstream_args = argparse.Namespace(lr=args.lr, batch_size=args.batch, dataset_file="coco", num_classes=1)
        payload = {"model": state, "optimizer": optimizer.state_dict(), "lr_scheduler": {"last_epoch": step},
                   "epoch": step, "args": upstream_args}  # fmt: skip
    elif method == "sr_tod":
        meta = {"epoch": 1, "iter": step, "dataset_meta": {"classes": CLASSES}, "mmengine_version": "0.10.7"}
        payload = {"meta": meta, "state_dict": state, "optimizer": optimizer.state_dict(),
                   "message_hub": {"runtime_info": {"iter": step, "dataset_meta": {"classes": CLASSES}}}}  # fmt: skip
    else:
        meta = {"CLASSES": CLASSES, "epoch": 1, "iter": step, "mmdet_version": "2.25.1", "mmcv_version": "1.7.1"}
        payload = {"meta": meta, "state_dict": state, "optimizer": optimizer.state_dict()}
    torch.save(payload, tmp)
    tmp.replace(path)
    torch.save(optimizer.state_dict(), optimizer_path(path))  # for --resume, read without unpickling objects


def learn_from_scratch(model: torch.nn.Module) -> None:
    """mmdet's recipe for detectors trained without ImageNet weights (configs/scratch: ``frozen_stages=-1``,
    ``norm_eval=False``). Nothing pretrained is available here, and random BatchNorm statistics frozen
    at identity leave a 50-layer ResNet unnormalized; so every BatchNorm of the deployed network learns
    its statistics and every layer trains. ThumbDet's teacher, frozen upstream, stays frozen."""
    trainable = model.student if hasattr(model, "student") else model
    trainable.requires_grad_(True)
    for module in trainable.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()


def seed_backbone(model: torch.nn.Module, donor: Path) -> int:
    """Start the student's ResNet-50 from another model's trained one. Upstream starts it from ImageNet
    weights, which this offline machine does not have; a ResNet-50 trained on the same synthetic set (SR-TOD's
    and CFINet's mmdet ResNet-50, whose keys are torchvision's) is the nearest thing. Copies every backbone
    tensor whose name and shape match and returns how many; the donor is read as any user checkpoint is."""
    body = model.student.backbone[0].body.state_dict()
    donated = {k.removeprefix("backbone."): v for k, v in read_checkpoint(donor).state_dict.items()}
    matched = {k: v for k, v in donated.items() if k in body and v.shape == body[k].shape}
    if not matched:
        raise UserError(f"{donor} holds no ResNet-50 under backbone.*", "use --backbone-from sr_tod or cfinet")
    model.student.backbone[0].body.load_state_dict(matched, strict=False)
    return len(matched)


def deformable_detr_param_groups(model: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
    """Deformable-DETR's main.py: the backbone (``backbone.0``) at lr_backbone = lr / 10, the sampling offsets
    and reference points at lr * lr_linear_proj_mult (0.1), everything else at lr."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in model.student.named_parameters():
        if param.requires_grad:
            slow = name.startswith("backbone.0") or "sampling_offsets" in name or "reference_points" in name
            groups.setdefault(0.1 if slow else 1.0, []).append(param)
    return [{"params": params, "lr_scale": scale, "lr": lr * scale} for scale, params in groups.items()]


def prime_box_regression(model: torch.nn.Module) -> None:
    """Start FCOS's distances at one stride a side. Its regression is ReLU(scale * conv) x stride
    (mmdet's norm_on_bbox), and a box of zero width or height has no GIoU gradient: with the
    seeded bias perturbation, a coordinate whose bias is negative starts dead everywhere, and the
    loss sat at exactly 1.000 for hundreds of steps. A positive bias gives every point a box."""
    for module in model.modules():
        if isinstance(module, FCOSHead):
            torch.nn.init.constant_(module.conv_reg.bias, 1.0)


def optimizer_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".optimizer.pt")


def held_out_ap50(method: str, checkpoint: Path, overrides: dict[str, Any], val: Path) -> dict[str, Any]:
    """As a user goes on: ``export --checkpoint`` (with its parity check), then ``eval`` on torch and onnxruntime.
    A failed parity check is printed, and the export is then evaluated unverified (``--no-verify``): the
    run's AP is still worth having, and the failure is a finding to follow up."""
    def export(verify: bool) -> Any:
        return export_model(method, checkpoint.parent / "export", checkpoint, overrides=overrides,
                            name=checkpoint.stem, verify=verify, log=lambda _l: None)  # fmt: skip

    try:
        exported = export(verify=True)
    except UserError as error:
        log(f"export --checkpoint {checkpoint}: {error.problem}; evaluating it exported with --no-verify")
        exported = export(verify=False)
    report = evaluate_model(exported.onnx_path, val / ANNOTATIONS, val / IMAGES, backends="torch,onnxruntime",
                            log=lambda _l: None)  # fmt: skip
    return {backend: {k: metrics[k] for k in ("AP", "AP50", "APvt", "APt", "APs")}
            for backend, metrics in report.results.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), required=True)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--size", default=None, help="Default: 128x128, or the model's minimum where larger.")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--val", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help="Default: the model's.")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--resume", action="store_true", help="Continue from <cache>/<model>.pth.")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone-from", choices=list(MODELS), default=None,
                        help="ThumbDet: start its ResNet-50 from this model's checkpoint (upstream: ImageNet's).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    method, extra, optimizer_name, base_lr = MODELS[args.model]
    if args.backbone_from and method != "thumbdet":  # before the data set and the model are made
        raise UserError("--backbone-from is for thumbdet", "leave it out for this model")
    optimizer_name = args.optimizer or optimizer_name
    args.lr = args.lr or base_lr
    if args.size is None:
        side = max(DEFAULT_SIDE, load_recipe(method, None, extra).min_size)
        args.size = f"{side}x{side}"
    size_hw = parse_input_size(args.size)
    data = args.cache / f"data-{args.size}"
    train_set = synthetic_split(data / "train", args.images, TRAIN_SEED, size_hw)
    val_set = synthetic_split(data / "val", args.val, VAL_SEED, size_hw)
    overrides = {**extra, "input_size": args.size, "classes": list(CLASSES),
                 "model": {**extra.get("model", {}), "num_classes": 1}}  # fmt: skip
    recipe = load_recipe(method, None, overrides)
    checkpoint = args.cache / f"{args.model}.pth"
    history_path = checkpoint.with_suffix(".log.json")
    resume = args.resume and checkpoint.is_file()
    model, _ = build_training_model(recipe, checkpoint if resume else None, args.seed, log)
    model.train()
    learn_from_scratch(model)
    if not resume:
        prime_box_regression(model)
    if args.backbone_from and resume:
        log(f"backbone: --backbone-from {args.backbone_from} not applied: resuming, the checkpoint's backbone goes on")
    elif args.backbone_from:
        donor = args.cache / f"{args.backbone_from}.pth"
        log(f"backbone: {seed_backbone(model, donor)} tensors from {donor}")
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "thumbdet":
        optimizer = torch.optim.AdamW(deformable_detr_param_groups(model, args.lr), lr=args.lr, weight_decay=1e-4)
    elif optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    else:
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    history = json.loads(history_path.read_text()) if resume and history_path.is_file() else {"loss": [], "eval": []}
    step = history["loss"][-1]["step"] if history["loss"] else 0
    if resume:
        try:
            optimizer.load_state_dict(torch.load(optimizer_path(checkpoint), map_location="cpu", weights_only=True))
        except ValueError as error:  # e.g. a ThumbDet run from before its parameter groups
            raise UserError(f"{optimizer_path(checkpoint)} does not fit this optimizer ({error})",
                            "move the checkpoint aside and train from the start") from None  # fmt: skip
    cxcywh = method == "thumbdet"
    samples = load_split(train_set, size_hw, cxcywh)
    log(f"{args.model}: {method} {args.size}, {len(samples)} training images, {optimizer_name} lr {args.lr}, "
        f"{'resumed at step ' + str(step) if resume else 'from seeded weights'}, {args.minutes} min")  # fmt: skip
    rng = np.random.default_rng(args.seed + step)
    start, last_print, running = time.perf_counter(), 0.0, {}
    while time.perf_counter() - start < 60 * args.minutes:
        picks = rng.choice(len(samples), size=args.batch, replace=False)
        batch = [samples[i] if rng.random() < 0.5 else flipped(*samples[i], cxcywh) for i in picks]
        images = torch.stack([b[0] for b in batch])
        lr = args.lr * min(1.0, (step + 1) / WARMUP_STEPS)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        losses = model.training_losses(images, [b[1] for b in batch])
        total = sum(losses.values())
        if not math.isfinite(float(total.detach())):
            log(f"step {step}: loss is {float(total.detach())}; stopping (lower --lr)")
            break
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP_MAX_NORM.get(args.model, DEFAULT_CLIP_MAX_NORM))
        optimizer.step()
        step += 1
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        running["count"] = running.get("count", 0) + 1
        elapsed = time.perf_counter() - start
        if elapsed - last_print > 60 or elapsed >= 60 * args.minutes:
            count = running.pop("count")
            means = {k: round(v / count, 4) for k, v in running.items()}
            history["loss"].append({"step": step, "seconds": round(elapsed), **means})
            log(f"step {step:5d} {elapsed / 60:5.1f} min  loss {sum(means.values()):.4f}  " +
                " ".join(f"{k} {v:.3f}" for k, v in means.items()))  # fmt: skip
            running, last_print = {}, elapsed
    save_checkpoint(checkpoint, args.model, model, optimizer, step, args)
    metrics = held_out_ap50(method, checkpoint, overrides, val_set)
    history["eval"].append({"step": step, **metrics})
    history_path.write_text(json.dumps(history, indent=2) + "\n")
    print(f"{args.model}: {step} steps; wrote {checkpoint}; held-out set ({args.val} images):")
    for backend, values in metrics.items():
        shown = " ".join(f"{k} {'-' if v is None else f'{100 * v:.1f}'}" for k, v in values.items())
        print(f"  {backend:12s} {shown}")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        raise SystemExit(error.line()) from None
