"""Command line: ``dmgrd train | test | predict | export | benchmark | info | demo`` (also ``python -m dmgrd``)."""

import argparse
import csv
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dmgrd import benchmarking, engine, models, ops, report, visualize
from dmgrd._version import __version__
from dmgrd.data import BTAD, Categories, Folder, MVTecAD, Synthetic, VisA
from dmgrd.data.io import list_images
from dmgrd.environment import environment, package_version
from dmgrd.export import export_onnx, export_openvino
from dmgrd.imaging import rgb_float
from dmgrd.infer import Inferencer, pixels
from dmgrd.layout import parse_size
from dmgrd.metrics import compute_metrics
from dmgrd.models import METHODS
from dmgrd.models.checkpoint import read_payload

DATASETS = {"mvtec": MVTecAD, "visa": VisA, "btad": BTAD, "folder": Folder, "synthetic": Synthetic}
PRESET_NAMES = sorted({name for method in METHODS.values() for name in method.config_class.PRESETS})
CHECKPOINT_NAME = "model.pt"
CONFIG_NAME = "config.json"
# train options that config.json does not record: where to write, whether to resume, the file itself
UNRECORDED = ("command", "handler", "out", "resume", "config")
# what config.json records besides the train options; `train --config` skips these entries
RECORD_ONLY = ("model", "train_images", "validation_images", "thresholds", "category_thresholds", "environment",
               "checkpoint")


# -- data ---------------------------------------------------------------------------------------------------

def make_dataset(args, split: str, image_size):
    """The data set named by ``--data`` (several: :class:`Categories`) or ``--dataset`` for ``split``."""
    if args.data:
        return _categories(args, split, image_size)
    cls = DATASETS[args.dataset]
    if args.dataset == "folder":
        if not args.normal_dir:
            raise SystemExit("dmgrd: --dataset folder needs --normal-dir (and --abnormal-dir/--mask-dir to test)")
        if split == "train":
            return cls(args.normal_dir, image_size=image_size)
        return cls(args.normal_dir, args.abnormal_dir, args.mask_dir, image_size=image_size)
    if args.dataset == "synthetic":
        return cls(split=split, category=args.category or "texture", image_size=image_size, seed=args.seed)
    if not args.data_root or not args.category:
        raise SystemExit(f"dmgrd: --dataset {args.dataset} needs --data-root and --category")
    return cls(args.data_root, args.category, split, image_size=image_size)


def _categories(args, split: str, image_size):
    """One ``--data`` entry's data set, or the :class:`Categories` of several (named as the benchmark names them)."""
    if args.data_root or args.category or args.normal_dir:
        raise SystemExit("dmgrd: --data replaces --data-root, --category and --normal-dir: give one or the other")
    sets = {}
    for spec in args.data:
        name = benchmarking.data_name(spec)
        if name in sets:
            raise SystemExit(f"dmgrd: two --data entries are named {name!r}; categories need distinct names")
        sets[name] = benchmarking.open_data(spec, split, image_size, args.seed)
    return next(iter(sets.values())) if len(sets) == 1 else Categories(sets)


# -- commands -----------------------------------------------------------------------------------------------

def init_distributed(device: str) -> tuple[int, str]:
    """Join the process group ``torchrun`` describes (gloo on CPU, NCCL on GPUs): (rank, this rank's device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, device
    use_cuda = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), device


def train(args) -> int:
    """Fit a model, then write the run folder: the checkpoint (with decision thresholds), config.json (every
    train option, loadable with --config, and what the run ran on) and the training log."""
    cls = METHODS[args.method]
    if args.preset not in cls.config_class.PRESETS:
        raise SystemExit(f"dmgrd: {args.method} has no preset {args.preset!r}; its presets: "
                         f"{', '.join(cls.config_class.PRESETS)}")
    recorded = _recorded_options(args)
    rank, args.device = init_distributed(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / CHECKPOINT_NAME
    data = make_dataset(args, "train", args.image_size)
    train_data, validation = engine.split_validation(data, args.val_fraction, args.seed)
    options = {"textures": args.textures} if args.method == "dmgrd" and args.textures else {}
    torch.manual_seed(args.seed)
    model = cls(args.backbone, weights=args.weights, preset=args.preset, image_size=args.image_size,
                seed=args.seed, **options).to(args.device)
    start = time.perf_counter()
    history = model.fit(train_data, steps=args.steps, batch_size=args.batch_size, num_workers=args.num_workers,
                        checkpoint=checkpoint, checkpoint_every=args.checkpoint_every, resume=args.resume,
                        checkpoint_activations=args.checkpoint_activations)
    seconds = time.perf_counter() - start
    if rank > 0:
        return 0
    if validation is not None:
        engine.calibrate_thresholds(model, validation, args.threshold_quantile, args.batch_size,
                                          args.num_workers)
    model.save(checkpoint, train_state=read_payload(checkpoint)["train_state"])
    config = {**recorded, "model": model.config.to_dict(), "train_images": len(train_data),
              "validation_images": 0 if validation is None else len(validation), "thresholds": model.thresholds,
              **({"category_thresholds": model.category_thresholds} if model.category_thresholds else {}),
              "checkpoint": CHECKPOINT_NAME, "environment": environment()}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    _write_rows(out / "train_log.csv", [{"step": i, **row} for i, row in enumerate(history)])
    print(f"trained {args.method} for {args.steps} steps in {seconds:.1f} s -> {checkpoint}")
    return 0


def test(args) -> int:
    """Evaluate a checkpoint on a test split: metrics.json, scores.csv, result panels, roc.png and, with
    --report, the HTML report."""
    model = models.load(args.checkpoint, map_location=args.device)
    if args.report and model.thresholds is None:
        raise SystemExit(f"dmgrd: --report needs decision thresholds, and {args.checkpoint} stores none (trained "
                         "with --val-fraction 0)")
    data = make_dataset(args, "test", model.config.image_size)
    out = Path(args.out)
    results = engine.predict(model, data, args.batch_size, args.num_workers)
    metrics = compute_metrics(results.scores, results.labels, results.maps, results.masks)
    per_category = engine.category_metrics(results)
    out.mkdir(parents=True, exist_ok=True)
    written = {**metrics, "per_category": per_category} if per_category else metrics
    (out / "metrics.json").write_text(json.dumps(written, indent=1))
    _write_rows(out / "scores.csv", [{"path": p, "label": int(y), "score": float(s)}
                                     for p, y, s in zip(results.paths, results.labels, results.scores, strict=True)])
    visualize.save_roc_plot(results.labels.numpy(), results.scores.numpy(), out / "roc.png", title=model.method)
    if args.overlays:
        vmin, vmax = visualize.map_range(results.maps)
        for i, path in enumerate(tqdm(results.paths, desc="writing panels", dynamic_ncols=True)):
            panel = visualize.result_panel(data[i]["image"], results.maps[i], vmin, vmax, results.masks[i])
            visualize.save_png(panel, out / "overlays" / f"{i:04d}_{Path(path).stem}.png")
    if args.report:
        shown = ", ".join(args.data) if args.data else f"{args.dataset} {args.category or ''}"
        report.write_report(args.report, results, data, model.thresholds, metrics,
                            title=f"{model.method} on {shown}: {args.checkpoint}",
                            category_thresholds=model.category_thresholds, category_metrics=per_category)
        print(f"report: {Path(args.report) / 'index.html'}")
    print(json.dumps(written, indent=1))
    return 0


def predict(args) -> int:
    """Score images (files or folders) with a checkpoint, ONNX file or OpenVINO IR: scores.csv (score, normalised
    score, label), anomaly maps (float32 TIFF), overlays and, with --masks, binary masks; --tile scores large
    images tile by tile at their own resolution."""
    inferencer = Inferencer(args.checkpoint, device=args.device)
    files = _image_files(args.inputs)
    if args.category is not None:
        try:
            inferencer.use_category(args.category)
        except ValueError as exc:
            raise SystemExit(f"dmgrd: {exc}") from None
    threshold = args.threshold if args.threshold is not None else inferencer.metadata.pixel_threshold
    if args.masks and threshold is None:
        raise SystemExit("dmgrd: the model stores no threshold (trained with --val-fraction 0): pass --threshold")
    out = Path(args.out)
    rows = []
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        if args.tile is None:  # decoded once: the model's inputs are also the overlays' images
            images = [inferencer.preprocess(f).transpose(1, 2, 0) for f in chunk]
            results = inferencer.predict_batch(images, args.batch_size)
        else:
            images = [pixels(f) for f in chunk]
            results = [inferencer.predict_tiled(image, None if args.tile == "input" else args.tile, args.stride,
                                                args.batch_size) for image in images]
        for file, image, result in zip(chunk, images, results, strict=True):
            rows.append(_prediction_row(file, result))
            amap = torch.from_numpy(result.anomaly_map)
            visualize.save_png(result.anomaly_map, out / f"{file.stem}_map.tiff")
            if args.overlays:
                vmin, vmax = (0.0, 2 * threshold) if threshold else visualize.map_range(amap)
                rgb = torch.from_numpy(rgb_float(image)).permute(2, 0, 1)
                visualize.save_png(visualize.overlay(rgb, amap, vmin, vmax), out / f"{file.stem}_overlay.png")
            if args.masks:
                mask = result.anomaly_map > threshold
                visualize.save_png(mask.astype("uint8") * 255, out / f"{file.stem}_mask.png")
            print("\t".join([str(file), f"{result.score:.5f}", *(
                [f"{result.normalized_score:.3f}"] if result.normalized_score is not None else []), *(
                ["ANOMALOUS" if result.label else "ok"] if result.label is not None else [])]))
    _write_rows(out / "scores.csv", rows)
    return 0


def _prediction_row(file: Path, result) -> dict:
    row = {"path": str(file), "score": result.score}
    if result.normalized_score is not None:
        row["normalized_score"] = result.normalized_score
    if result.label is not None:
        row["anomalous"] = int(result.label)
    return row


def export(args) -> int:
    """Write the model as ONNX or OpenVINO IR (pure-torch op paths, the decision metadata inside); ONNX is
    checked against torch when onnxruntime is installed."""
    model = models.load(args.checkpoint)
    if args.format == "openvino":
        print(f"wrote {export_openvino(model, args.out, opset=args.opset)}")
        return 0
    error = export_onnx(model, args.out, opset=args.opset)
    print(f"wrote {args.out}" + (f"; max |onnxruntime - torch| map error {error:.2e}" if error is not None else
                                  " (onnxruntime not installed: not checked)"))
    return 0


def benchmark(args) -> int:
    """Train and evaluate a grid of data sets x methods x variants x seeds (resumable); print the summary."""
    variants = dict(map(benchmarking.parse_variant, args.variant)) if args.variant else {
        preset: {"preset": preset} for preset in args.presets.split(",")}
    budget = benchmarking.Budget(args.backbone, args.weights, args.image_size, args.steps, args.batch_size,
                                 args.device)
    seeds = [int(s) for s in args.seeds.split(",")]
    benchmarking.benchmark(args.data, args.methods.split(","), args.out, seeds, variants, budget,
                           isolate=not args.in_process)
    print((Path(args.out) / "summary.md").read_text())
    return 0


def info(args=None) -> int:
    """Print versions, devices, and per op and backend whether it runs here or why not."""
    print(f"dmgrd {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"triton {package_version('triton')}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}  {torch.cuda.get_device_name(i)}  (CUDA {torch.version.cuda})")
    else:
        print("cuda: no device")
    print(f"backend requested: {ops.requested_backend()}  (DMGRD_BACKEND or dmgrd.ops.use_backend)")
    print("\nbackends:")
    for name, status in ops.backends().items():
        print(f"  {name:<7} {'yes' if status.available else 'no ':<4} {status.detail}")
    print("\nops:")
    rows = ops.op_table()
    width = max(len(r[0]) for r in rows)
    for op, backend, device, state in rows:
        print(f"  {op:<{width}}  {backend:<7} {device:<5} {state}")
    return 0


def demo(args) -> int:
    """Train DM-GRD on the built-in Synthetic data, evaluate, and write the HTML report (a few minutes on a CPU)."""
    info()
    out = Path(args.out)
    base = ["--dataset", "synthetic", "--category", args.category, "--device", args.device, "--seed", str(args.seed),
            "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers)]
    print(f"\ntraining DM-GRD on the built-in Synthetic '{args.category}' data ({args.steps} steps) ...")
    main(["train", *base, "--method", "dmgrd", "--backbone", "efficientnet_lite0", "--image-size",
          _size_text(args.image_size), "--steps", str(args.steps), "--out", str(out)])
    print("\nevaluating on the Synthetic test split ...")
    return main(["test", *base, "--checkpoint", str(out / CHECKPOINT_NAME), "--out", str(out / "test"),
                 "--no-overlays", "--report", str(out / "report")])


# -- helpers ------------------------------------------------------------------------------------------------

def _preset_help() -> str:
    """'clean, official (every method); dmgrd also: light', from the methods' own presets."""
    common = set.intersection(*(set(method.config_class.PRESETS) for method in METHODS.values()))
    extra = {name: sorted(set(method.config_class.PRESETS) - common) for name, method in sorted(METHODS.items())}
    return f"{', '.join(sorted(common))} (every method)" + "".join(
        f"; {name} also: {', '.join(names)}" for name, names in extra.items() if names)


def _size(text: str) -> int | tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _tile(text: str) -> str | int | tuple[int, int]:
    return text if text == "input" else _size(text)


def _size_text(size: int | tuple[int, int]) -> str:
    return str(size) if isinstance(size, int) else f"{size[0]}x{size[1]}"


def _recorded_options(args) -> dict:
    """The train options as config.json records them: ``--image-size`` as text, weights None as "none"."""
    options = {k: v for k, v in vars(args).items() if k not in UNRECORDED}
    options["image_size"] = _size_text(args.image_size)
    options["weights"] = args.weights or "none"
    return options


def _config_arguments(path: str, argv: list[str], known: set[str]) -> list[str]:
    """``argv`` (a ``train`` command line) with the options of config file ``path`` inserted before its own, so
    that the command line's win; the file's entries go through the same parsing and checks as typed ones."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"dmgrd: config file not found: {file}")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"dmgrd: cannot read config file {file} as JSON: {error}") from None
    if not isinstance(config, dict):
        raise SystemExit(f"dmgrd: config file {file} must hold a JSON object of train options")
    unknown = sorted(set(config) - known - set(RECORD_ONLY) - set(UNRECORDED))
    if unknown:
        raise SystemExit(f"dmgrd: config file {file} has unknown train option(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    tokens = []
    for name in sorted(known & set(config)):
        value, flag = config[name], "--" + name.replace("_", "-")
        if value is None or (isinstance(value, list) and any(a.split("=")[0] == flag for a in argv)):
            continue  # None: not given; a list option given on the command line replaces the file's
        if isinstance(value, bool):  # a switch: --name or --no-name
            tokens.append(flag if value else "--no-" + flag[2:])
            continue
        for item in value if isinstance(value, list) else [value]:
            tokens += [flag, str(item)]
    return [argv[0], *tokens, *argv[1:]]


def _image_files(inputs: Sequence[str]) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = list_images(item)
            if not found:
                raise SystemExit(f"dmgrd: no images in folder {item}")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise SystemExit(f"dmgrd: no such file or folder: {item}")
    return files


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


# -- parser -------------------------------------------------------------------------------------------------

def _common(parser: argparse.ArgumentParser, batch_size: int = 8) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=111)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--num-workers", type=int, default=0)


def _data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append",
                        help="a category folder in the MVTec AD layout, or synthetic:texture / synthetic:object "
                             "(repeatable: several train one model on all, with metrics and thresholds per "
                             "category); replaces --dataset, --data-root and --category")
    parser.add_argument("--dataset", choices=list(DATASETS), default="mvtec")
    parser.add_argument("--data-root", help="data set root folder (mvtec, visa, btad)")
    parser.add_argument("--category", help="category, e.g. bottle (synthetic: texture or object)")
    parser.add_argument("--normal-dir", help="folder data set: normal images")
    parser.add_argument("--abnormal-dir", help="folder data set: defective images (test)")
    parser.add_argument("--mask-dir", help="folder data set: masks named like the defective images (test)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmgrd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train a model on normal images")
    _data_options(p)
    _common(p)
    p.add_argument("--method", choices=sorted(METHODS), default="dmgrd")
    p.add_argument("--backbone", default="wide_resnet50_2")
    p.add_argument("--weights", default="imagenet", help='"imagenet", a .pth file, or "none"')
    p.add_argument("--preset", choices=PRESET_NAMES, default="clean",
                   help=_preset_help())
    p.add_argument("--image-size", type=_size, default=256, help="N (square) or HxW, e.g. 640x256")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--textures", help="DM-GRD: texture folder (DTD layout); default: procedural textures")
    p.add_argument("--val-fraction", type=float, default=0.1, help="normal training images held out for thresholds")
    p.add_argument("--threshold-quantile", type=float, default=0.999, help="pixel threshold: quantile of validation")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from OUT/model.pt")
    p.add_argument("--checkpoint-activations", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute the student's activations in the backward pass: less memory, the same result")
    p.add_argument("--config", help="a run's config.json (or any JSON object of these options) to train with; "
                                    "options given here override it")
    p.add_argument("--out", required=True)
    p.set_defaults(handler=train)

    p = commands.add_parser("test", help="evaluate a checkpoint on a test split")
    _data_options(p)
    _common(p, batch_size=16)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--no-overlays", dest="overlays", action="store_false", help="skip the result panels")
    p.add_argument("--report", help="write the HTML report (index.html, report.json, PNGs) into this folder")
    p.set_defaults(handler=test)

    p = commands.add_parser("predict", help="score new images")
    _common(p, batch_size=16)
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                   help="a checkpoint (.pt), an ONNX file (.onnx) or an OpenVINO IR (.xml)")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--masks", action="store_true", help="also write binary masks")
    p.add_argument("--threshold", type=float, help="pixel threshold (default: the one stored at training)")
    p.add_argument("--no-overlays", dest="overlays", action="store_false", help="skip the overlay images")
    p.add_argument("--tile", type=_tile,
                   help="score each image at its own size in tiles of HxW ('input': the model's input size), "
                        "blending their maps; the score is the largest tile score")
    p.add_argument("--stride", type=_size, help="with --tile: the step between tiles, HxW (default: half the tile)")
    p.add_argument("--category", help="use this category's stored thresholds (a model trained on several --data)")
    p.set_defaults(handler=predict)

    p = commands.add_parser("export", help="export a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx",
                   help="openvino: an IR .xml (+ .bin), needs pip install 'dmgrd[openvino]'")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--out", required=True)
    p.set_defaults(handler=export)

    p = commands.add_parser("benchmark", help="train and evaluate a grid of methods x data sets x seeds")
    p.add_argument("--data", action="append", required=True,
                   help="a category folder in the MVTec AD layout, or synthetic:texture / synthetic:object "
                        "(repeatable)")
    p.add_argument("--methods", default="rd4ad,dmgrd", help=f"comma-separated, of {', '.join(sorted(METHODS))}")
    p.add_argument("--presets", default="clean", help="comma-separated presets, one variant each")
    p.add_argument("--variant", action="append",
                   help="name:key=value,... config options of one variant (repeatable; replaces --presets)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet", help='"imagenet", a .pth file, or "none"')
    p.add_argument("--image-size", type=_size, default=256, help="N (square) or HxW, e.g. 640x256")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--in-process", action="store_true",
                   help="run the cells in this process (faster start; peak memory is then the whole run's)")
    p.add_argument("--out", required=True)
    p.set_defaults(handler=benchmark)

    p = commands.add_parser("info", help="backends, devices and versions")
    p.set_defaults(handler=info)

    p = commands.add_parser("demo", help="train and evaluate DM-GRD on built-in synthetic data")
    _common(p)
    p.add_argument("--category", choices=["texture", "object"], default="texture")
    p.add_argument("--image-size", type=_size, default=64, help="N (square) or HxW")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="dmgrd-demo")
    p.set_defaults(handler=demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        known = set(vars(parser.parse_args(["train", "--out", "-"]))) - set(UNRECORDED)
        args = parser.parse_args(_config_arguments(args.config, argv, known))
    if getattr(args, "weights", None) == "none":
        args.weights = None
    return args.handler(args)
