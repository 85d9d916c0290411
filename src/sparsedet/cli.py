"""The ``sparsedet`` command line (also ``python -m sparsedet``)."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

EPILOG = """\
configs: a bundled name (list them with `sparsedet configs`) or a YAML path. Any config value can
be overridden after it with dotted KEY=VALUE pairs (values are YAML), e.g.
  sparsedet train sparse_rcnn/mobilenetv2_fpn_tiny_coco solver.max_iter=500 model.num_proposals=50
  sparsedet train my.yaml data.train.annotations=/data/train.json data.train.images=/data/train

multi-GPU / multi-process training uses torchrun (gloo on CPU, NCCL on GPU):
  torchrun --nproc_per_node 8 -m sparsedet train CONFIG --output runs/x
  two machines: add --nnodes 2 --node_rank {0,1} --master_addr HOST0 --master_port 29500
solver.images_per_batch is the total over all processes.
"""

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\-]*=")


def _split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits positional arguments into KEY=VALUE overrides and the rest (paths)."""
    overrides = [item for item in items if _OVERRIDE.match(item)]
    return overrides, [item for item in items if not _OVERRIDE.match(item)]


def _default_output(config: str) -> Path:
    return Path("runs") / Path(config).with_suffix("").as_posix().replace("/", "_")


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine.distributed import init_distributed
    from .engine.trainer import Trainer
    from .errors import check_writable_dir
    from .log import setup_logging

    output = Path(args.output) if args.output else _default_output(args.config)
    ctx = init_distributed(args.device)
    if ctx.is_main:
        check_writable_dir(output)
    setup_logging(output / "train.log", main_process=ctx.is_main)
    config = load_config(args.config, args.overrides)
    trainer = Trainer(config, output, resume=args.resume, device=args.device, progress=not args.no_progress)
    result = trainer.train()
    if ctx.is_main:
        written = [name for name in ("last.pth", "best.pth", "metrics.jsonl", "tensorboard/")
                   if (output / name).exists()]
        print(f"outputs in {output}/ ({', '.join(written)})")
        if trainer.stopped_early:
            print(f"stopped at iteration {trainer.iteration}: continue with --resume")
        elif result is not None:
            others = ", ".join(f"{n} {100 * result.stats[n]:.1f}" for n in result.rows[0][1:3])  # AP50, AP75 / mMR, Recall
            print(f"final AP {100 * result.stats['AP']:.1f} ({others})")
    return 130 if trainer.stopped_early else 0  # stopped by Ctrl-C: 128 + SIGINT, as shells expect


def _load_for_inference(args: argparse.Namespace):
    import sparsedet

    return sparsedet.load(args.weights, config=args.config, overrides=args.overrides,
                          device=args.device or "cpu")


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .data import read_dataset
    from .engine.evaluate import evaluate_model
    from .errors import check_writable_dir
    from .log import setup_logging

    output = Path(args.output) if args.output else Path(args.weights).parent / "eval"
    check_writable_dir(output)
    setup_logging(output / "eval.log")
    model = _load_for_inference(args)
    data_cfg = model.config.get("data") or {}
    if not data_cfg.get(args.split):
        raise ValueError(f"no data.{args.split} section in the config of {args.weights}: give one with overrides, "
                         f"e.g. data.{args.split}.format=coco data.{args.split}.annotations=FILE "
                         f"data.{args.split}.images=DIR")
    dataset = read_dataset(data_cfg[args.split], data_cfg.get("root"), f"data.{args.split}")
    if args.batch_size:
        model.config.setdefault("test", {})["images_per_batch"] = args.batch_size
    if args.anchor_recall:
        from .engine.recall import anchor_recall

        recall = anchor_recall(model, dataset, model.config)
        for kind, values in recall.items():
            print(f"{kind:>9} " + "  ".join(f"AR@{n} {100 * v:.2f}" for n, v in values.items()))
        output.mkdir(parents=True, exist_ok=True)
        (output / "anchor_recall.json").write_text(json.dumps(recall, indent=1))
        print(f"wrote {output / 'anchor_recall.json'}")
        return 0
    result = evaluate_model(model, dataset, model.config, results_path=output / "results.json")
    print(result.table())
    (output / "metrics.json").write_text(json.dumps(result.to_dict(), indent=1))
    print(f"wrote {result.results_path or output / 'results.json'} and {output / 'metrics.json'}")
    return 0


DEFAULT_PREDICT_OUTPUT = "outputs/predict"


def expand_image_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns -> image paths.

    Raises:
        FileNotFoundError: an input matches nothing (names it).
    """
    import glob

    from .data.image_io import IMAGE_SUFFIXES

    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True)
                             if Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise FileNotFoundError(f"no image file, folder or glob match for {item!r}")
            paths += matches
    if not paths:
        raise FileNotFoundError(f"no images found in {list(inputs)}")
    return paths


def _predict_in_batches(model, paths: Sequence[Path], batch_size: int, score_threshold: float):
    """Yields ``(path, detections)`` for every path, ``batch_size`` images per forward pass. When a
    batch fails, its images are retried one by one, so only the image that cannot be processed gets
    its exception (yielded in place of the detections)."""
    from tqdm import tqdm

    import sparsedet

    with tqdm(total=len(paths), desc="predict", dynamic_ncols=True) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            try:
                outputs = sparsedet.predict(model, chunk, score_threshold=score_threshold, batch_size=batch_size)
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as err:  # noqa: BLE001 - retried per image below
                if len(chunk) == 1:
                    outputs = [err]
                else:
                    outputs = []
                    for path in chunk:
                        try:
                            outputs += sparsedet.predict(model, path, score_threshold=score_threshold)
                        except (KeyboardInterrupt, SystemExit, MemoryError):
                            raise
                        except Exception as single_err:  # noqa: BLE001 - reported by the caller
                            outputs.append(single_err)
            yield from zip(chunk, outputs)
            bar.update(len(chunk))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _cmd_predict(args: argparse.Namespace) -> int:
    import json
    from collections import Counter

    from tqdm import tqdm

    from .checkpoint import atomic_write_text
    from .data.sources import coco_image_ids
    from .outputs import next_free_folder
    from .visualize import draw_detections

    model = _load_for_inference(args)
    class_names = (model.config.get("data") or {}).get("class_names") or [
        f"class {i}" for i in range(model.num_classes)]
    paths = expand_image_inputs(args.inputs)
    if args.explain:  # a model without a query head is one error, not one skipped image per file
        from .explain import explain_prediction, require_explainable
        require_explainable(model)
    # An explicit --output is the user's choice; the default never overwrites an earlier run.
    output = Path(args.output) if args.output else next_free_folder(DEFAULT_PREDICT_OUTPUT)
    output.mkdir(parents=True, exist_ok=True)
    # image_id: the COCO id when the file belongs to a COCO set of the model's config, else the file name.
    coco_ids = coco_image_ids(model.config.get("data") or {}, paths)
    results, skipped = [], []
    try:
        for path, detections in _predict_in_batches(model, paths, args.batch_size, args.score_threshold):
            try:
                if isinstance(detections, Exception):
                    raise detections
                draw_detections(path, detections, class_names, score_threshold=args.score_threshold).save(
                    output / f"{path.stem}.png")
                if args.explain:
                    explain_prediction(model, path).save(output / f"{path.stem}_explain.png")
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except Exception as err:  # noqa: BLE001 - one unreadable or extreme image must not end the run
                skipped.append(path)
                tqdm.write(f"skipped {path}: {type(err).__name__}: {_one_line(err)}")
                continue
            labels = detections["labels"].tolist()
            counts = Counter(class_names[label] for label in labels)
            tqdm.write(f"{path}: " + (f"{len(labels)} detection{'s' if len(labels) != 1 else ''} ("
                                      + ", ".join(f"{name} {n}" for name, n in counts.most_common()) + ")"
                                      if labels else f"no detections above {args.score_threshold}"))
            image_id = coco_ids.get(path, path.name)
            for (x1, y1, x2, y2), score, label in zip(detections["boxes"].tolist(), detections["scores"].tolist(),
                                                       labels):
                results.append({"image_id": image_id, "file_name": str(path), "category_id": int(label),
                                "category_name": class_names[label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "score": float(score)})
    finally:  # the images done so far keep their results, whatever stopped the loop
        atomic_write_text(output / "results.json", json.dumps(results))
    done = len(paths) - len(skipped)
    print(f"{done} images: annotated PNGs and results.json (COCO results format, category_id = contiguous "
          f"label, image_id = COCO id or file name) in {output}/"
          + (f"; {len(skipped)} skipped (named above)" if skipped else ""))
    return 0 if done else 1


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    sizes = {key: getattr(args, key) for key in ("num_train", "num_val", "image_size") if getattr(args, key)}
    stats = run_demo(output_dir=args.output, iterations=args.iterations, seed=args.seed, device=args.device,
                     model=args.model, resume=args.resume, **sizes)
    return 130 if stats is None else 0  # None: stopped by Ctrl-C (128 + SIGINT, as shells expect)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    options = {"keep_head": args.keep_head} if args.keep_head else {}
    if options and args.arch != "asag":
        raise SystemExit(f"--keep-head applies to asag checkpoints only, not {args.arch}")
    result = convert_checkpoint(args.arch, args.src, args.dst, **options)
    print(result.report)
    overrides = " ".join(f"{k}={v}" for k, v in result.config_overrides.items())
    print(f"load it with: sparsedet.load({str(args.dst)!r})  (architecture overrides: {overrides})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import math

    from .benchmark import load_detector, test_scale
    from .export import CSQ_NOT_EXPORTED, export_onnx

    if args.model.startswith("tv:"):
        raise ValueError(f"export takes a sparsedet checkpoint or config, not the torchvision baseline {args.model}")
    model = load_detector(args.model, args.overrides, "cpu")
    if args.image_size:
        size = tuple(args.image_size)
    else:  # the test scale's short side, with a 3:2 long side rounded up to /32 (COCO's 4:3 images fit)
        short, long = test_scale(model)
        size = (short, min(long, int(math.ceil(short * 1.5 / 32) * 32)))
    output = Path(args.output or Path(args.model).with_suffix("").name + ".onnx")
    if getattr(getattr(model.cfg, "csq", None), "enabled", False):
        print(f"note: {CSQ_NOT_EXPORTED}")
    export_onnx(model, output, image_size=size, dynamic=args.dynamic, batch_size=args.batch,
                max_detections=args.max_detections, opset=args.opset)
    shape = f"(B={args.batch}, 3, {'H' if args.dynamic else size[0]}, {'W' if args.dynamic else size[1]})"
    print(f"wrote {output}: input images {shape} float32 RGB 0-255; outputs boxes (B, {args.max_detections}, 4), "
          f"scores, labels (B, {args.max_detections}), num_detections (B,)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from .benchmark import (benchmark, check_device, format_results, is_torchvision, load_average, load_detector,
                            machine_header, model_candidate, onnx_candidate, parse_size, random_image, test_scale,
                            warn_if_busy)

    device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch < 1 or args.runs < 1:
        raise ValueError(f"--batch and --runs must be >= 1, got {args.batch} and {args.runs}")
    print(machine_header(device))
    if device.type == "cpu":
        warn_if_busy()
    models = []
    for index, spec in enumerate([args.model, *args.compare]):
        torch.manual_seed(args.seed + index)  # random-init models: the same weights on every call
        models.append(load_detector(spec, args.overrides if index == 0 else (), device))
    if args.images:
        from .data.image_io import read_image
        from .data.transforms import resize_shortest_edge

        short, long = test_scale(models[0])
        images = [resize_shortest_edge(read_image(p), short, long).float().to(device)
                  for p in expand_image_inputs(args.images)]
        input_sets = {f"{len(images)} images at short side {short}":
                      [images[i:i + args.batch] for i in range(0, len(images), args.batch)]}
    else:
        sizes = [parse_size(text) for text in args.sizes.split(",") if text]
        input_sets = {f"{h}x{w}": [[random_image((h, w), seed).to(device) for seed in range(args.batch)]]
                      for h, w in sizes}
    with tempfile.TemporaryDirectory() as folder:
        for title, batches in input_sets.items():
            candidates = [model_candidate(m, batches) for m in models]
            if args.onnx:
                candidates += [onnx_candidate(m, batches, folder, args.threads or torch.get_num_threads())
                               for m in models if not is_torchvision(m)]
            results = benchmark(candidates, args.warmup, args.runs, device)
            print()
            print(format_results(results, f"=== {title}, batch {args.batch}, {args.warmup} warm-up + "
                                          f"{args.runs} timed runs, {torch.get_num_threads()} threads ==="))
    load = load_average()
    if load:
        print(f"\nload average at the end (1/5/15 min): {load}")
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from .config import bundled_configs, config_description

    names = bundled_configs()
    if args.markdown:  # README's config table
        print("| config | what |\n|---|---|")
        for name in names:
            print(f"| `{name}` | {config_description(name).rstrip('.')} |")
        return 0
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:<{width}}  {config_description(name)}")
    return 0


def _converter_names() -> list[str]:
    from .convert import CONVERTERS  # imports torch: only when the convert command is used

    return sorted(CONVERTERS)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser. ``command`` is the sub-command about to run, when known: only
    ``convert`` needs the converter registry (it imports torch), everything else parses without
    importing torch, so that ``--help``, ``--version`` and ``configs`` answer at once."""
    from . import __version__

    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="sparsedet", description="Sparse, query-based object detection: train, evaluate, predict, convert.",
        epilog=EPILOG, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"sparsedet {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line (also: SPARSEDET_DEBUG=1); "
                             "may be given anywhere on the command line")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a detector from a config", formatter_class=formatter, epilog=EPILOG,
        description="Trains the model of CONFIG on its data.train set, evaluates on data.val every "
                    "solver.eval_period iterations and at the end, and writes last.pth / best.pth, "
                    "metrics.jsonl, tensorboard/ and train.log to --output. Ctrl-C saves last.pth; "
                    "--resume continues exactly where it stopped.")
    train.add_argument("config", help="bundled config name or YAML path")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    train.add_argument("--output", help="output folder (default: runs/<config name>)")
    train.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                       help="continue from OUTPUT/last.pth, or from CHECKPOINT")
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (for log files)")
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser(
        "eval", help="COCO AP of a checkpoint on a data set", formatter_class=formatter,
        description="Evaluates WEIGHTS (a sparsedet checkpoint, or an official one with --config) on the "
                    "config's data.val (or --split) and writes results.json (COCO results format) and "
                    "metrics.json; prints AP, AP50, AP75, APs/m/l, AR1/10/100 and per-class AP.")
    evaluate.add_argument("weights", help="checkpoint file (.pth/.pkl)")
    evaluate.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                          help="config overrides, e.g. model.csq.enabled=true data.val.annotations=FILE")
    evaluate.add_argument("--config", help="config for checkpoints that carry none (official ones)")
    evaluate.add_argument("--split", default="val", help="data section to evaluate on (default: %(default)s)")
    evaluate.add_argument("--output", help="output folder (default: next to the weights, eval/)")
    evaluate.add_argument("--device", help="cpu, cuda or cuda:N (default: cpu)")
    evaluate.add_argument("--anchor-recall", action="store_true",
                          help="instead of AP: mmdet-style AR@100/300/1000 of the generated anchors and "
                               "proposals (ASAG)")
    evaluate.add_argument("--batch-size", type=_positive_int, metavar="N",
                          help="images per forward pass (default: the config's test.images_per_batch); "
                               "larger batches amortise GPU launches, same detections for same-size images")
    evaluate.set_defaults(func=_cmd_eval)

    predict = commands.add_parser(
        "predict", help="detect objects in image files, folders or globs", formatter_class=formatter,
        description="Runs WEIGHTS on every input image at the config's test scale and writes an annotated "
                    "PNG per image and results.json (boxes in each file's pixels) to --output.")
    predict.add_argument("weights", help="checkpoint file (.pth/.pkl)")
    predict.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="image files, folders or glob patterns; KEY=VALUE items are config overrides")
    predict.add_argument("--config", help="config for checkpoints that carry none (official ones)")
    predict.add_argument("--output", help=f"output folder (default: {DEFAULT_PREDICT_OUTPUT}, or predict2, predict3, "
                                          "... when it exists: an earlier run is never overwritten)")
    predict.add_argument("--score-threshold", type=float, default=0.3,
                         help="drop detections below this score (default: %(default)s)")
    predict.add_argument("--explain", action="store_true",
                         help="QueryDet: also draw the query heat-maps and the active sites of Cascade "
                              "Sparse Query; ASAG: the fixed and probing patches and the anchors they produced; "
                              "TSP: the FoIs / RoIs that entered the encoder (<name>_explain.png)")
    predict.add_argument("--device", help="cpu, cuda or cuda:N (default: cpu)")
    predict.add_argument("--batch-size", type=_positive_int, default=1, metavar="N",
                         help="images per forward pass (default: %(default)s); images of a batch are padded "
                              "to the largest, which can shift detections at the padded borders slightly")
    predict.set_defaults(func=_cmd_predict)

    demo = commands.add_parser(
        "demo", help="the main job: generate data, train a small QueryDet, evaluate (dense and CSQ), report",
        formatter_class=formatter,
        description="Generates the embedded synthetic data set (COCO format), trains a small QueryDet "
                    "(MobileNetV2-FPN, P2-P7 with a query head) on it on the CPU for a few minutes, evaluates "
                    "it on the held-out images densely and with Cascade Sparse Query, and writes report.md "
                    "with the AP tables, a loss curve, annotated predictions and a CSQ explanation figure.")
    demo.add_argument("--output", default="outputs/demo", help="folder for data, checkpoints and report "
                                                               "(default: %(default)s)")
    demo.add_argument("--iterations", type=int, default=None, help="training steps (default: the demo config's)")
    demo.add_argument("--seed", type=int, default=0, help="data and init seed (default: %(default)s)")
    demo.add_argument("--device", help="cpu or cuda (default: cpu)")
    demo.add_argument("--model", default="querydet", choices=["querydet", "sparse_rcnn", "tsp_fcos", "tsp_rcnn", "asag_a", "asag_s", "asag_d"],
                      help="detector to train (default: %(default)s; Sparse R-CNN converges slowly: its demo "
                           "config runs 3000 steps, about 25 min on 2 cores)")
    demo.add_argument("--resume", action="store_true",
                      help="continue the training in OUTPUT/train from its last.pth (after Ctrl-C); give the "
                           "same options as the first run (the stop message prints the command)")
    demo.add_argument("--num-train", type=int, help="generated training images (default: 200)")
    demo.add_argument("--num-val", type=int, help="generated held-out images (default: 40)")
    demo.add_argument("--image-size", type=int, help="side of the generated square images (default: 320)")
    demo.set_defaults(func=_cmd_demo)

    convert = commands.add_parser(
        "convert", help="convert an official checkpoint to sparsedet layout", formatter_class=formatter,
        description="Maps every key of an official checkpoint (.pth state_dict or {'model': ...}, or "
                    "detectron2 .pkl) onto sparsedet's names, checks every shape, and writes a bare "
                    "state_dict that loads with torch.load(dst, weights_only=True).")
    convert.add_argument("arch", choices=_converter_names() if command in (None, "convert") else None,
                         help="architecture of the checkpoint")
    convert.add_argument("src", help="official checkpoint file")
    convert.add_argument("dst", help="output .pth file")
    convert.add_argument("--keep-head", choices=["aux_0", "aux_1", "aux_2", "main"],
                         help="asag only: keep just this decoder head (the one-head speed model)")
    convert.set_defaults(func=_cmd_convert)

    export = commands.add_parser(
        "export", help="export a detector to ONNX (whole model in one graph)", formatter_class=formatter,
        description="Exports MODEL (a checkpoint, or a config: random weights) to ONNX: normalisation, padding, "
                    "head and post-processing in one graph. Input `images` (B, 3, H, W) float32 RGB 0-255 at "
                    "network resolution; outputs boxes (B, K, 4), scores (B, K), labels (B, K), num_detections "
                    "(B,) (rows past num_detections are zeros). Checked with onnx.checker.")
    export.add_argument("model", help="checkpoint file (.pth/.pkl) or config name / YAML path")
    export.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    export.add_argument("--format", default="onnx", choices=["onnx"], help="output format (default: %(default)s)")
    export.add_argument("--output", help="output file (default: ./<model name>.onnx)")
    sizes = export.add_mutually_exclusive_group()
    sizes.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"),
                       help="input size of the graph (default: the config's test short side x 1.5, /32)")
    sizes.add_argument("--dynamic", action="store_true", help="H and W free (any input size)")
    export.add_argument("--batch", type=int, default=1, help="images per call, fixed (default: %(default)s)")
    export.add_argument("--max-detections", type=int, default=100, help="K, rows of every output (default: %(default)s)")
    export.add_argument("--opset", type=int, help="ONNX opset (default: the newest supported, 16..20)")
    export.set_defaults(func=_cmd_export)

    bench = commands.add_parser(
        "bench", help="time models on the same inputs: latency, images/s, memory, per-part breakdown",
        formatter_class=formatter,
        description="Times MODEL (and --compare models) on the same inputs in one process: warm-up, then "
                    "interleaved timed runs; prints median/min/max ms, images/s, peak memory (CPU: process peak "
                    "RSS; CUDA: max allocated), ratios to MODEL and the per-part breakdown (preprocess, "
                    "backbone+FPN, head, post-processing). Configs get random weights (cost does not depend "
                    "on them). Torchvision baselines: tv:fasterrcnn_resnet50_fpn, tv:retinanet_resnet50_fpn, "
                    "tv:fcos_resnet50_fpn (fed the same pixels /255, without resizing).",
        epilog="example:\n  sparsedet bench sparse_rcnn/r50_fpn_100pro_3x --compare tv:fasterrcnn_resnet50_fpn "
               "--sizes 800x1216 --threads 2")
    bench.add_argument("model", help="config name / YAML path, checkpoint file, or tv:NAME")
    bench.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for MODEL")
    bench.add_argument("--images", nargs="+", metavar="FILE",
                       help="image files, folders or globs, resized to MODEL's test scale (default: random images)")
    bench.add_argument("--sizes", default="800x1216", help="random-image sizes HxW,... (default: %(default)s)")
    bench.add_argument("--batch", type=int, default=1, help="images per call (default: %(default)s)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    bench.add_argument("--threads", type=int, help="torch (and onnxruntime) intra-op threads (default: torch's)")
    bench.add_argument("--runs", type=int, default=5, help="timed runs per model (default: %(default)s)")
    bench.add_argument("--warmup", type=int, default=1, help="warm-up runs per model (default: %(default)s)")
    bench.add_argument("--compare", nargs="+", default=[], metavar="MODEL",
                       help="more models on the same inputs: configs, checkpoints, tv:NAME")
    bench.add_argument("--onnx", action="store_true", help="also time each sparsedet model exported to onnxruntime")
    bench.add_argument("--seed", type=int, default=0,
                       help="random init seed of model i: SEED + i (default: %(default)s; as benchmarks/ scripts)")
    bench.set_defaults(func=_cmd_bench)

    configs = commands.add_parser(
        "configs", help="list the bundled configs, one line each", formatter_class=formatter,
        description="Lists the bundled configs with a one-line description each (the first comment line "
                    "of the YAML file). Use a name as CONFIG of train, e.g. `sparsedet train "
                    "sparse_rcnn/mobilenetv2_fpn_cpu`.")
    configs.add_argument("--markdown", action="store_true", help="print a Markdown table (the README's)")
    configs.set_defaults(func=_cmd_configs)
    return parser


def _command_in(argv: Sequence[str]) -> Optional[str]:
    """The sub-command named in ``argv`` (its first non-option item), or None."""
    return next((item for item in argv if not item.startswith("-")), None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import check_device, exit_code, is_expected, one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is global but accepted anywhere (also after the command's own options).
    debug = "--debug" in argv or os.environ.get("SPARSEDET_DEBUG", "") not in ("", "0")
    argv = [item for item in argv if item != "--debug"]
    parser = build_parser(_command_in(argv) or "")
    # Overrides may come anywhere, also after options (argparse alone only takes them before).
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    stray = [item for item in extra if not _OVERRIDE.match(item)]
    if stray or (extra and args.command not in ("train", "eval", "predict", "export", "bench")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if args.command == "train" and isinstance(args.resume, str) and _OVERRIDE.match(args.resume):
        extra.insert(0, args.resume)  # `--resume KEY=VALUE`: the override is not a checkpoint path
        args.resume = True
    if args.command in ("train", "eval", "export", "bench"):
        args.overrides = list(args.overrides) + extra
    elif args.command == "predict":
        args.overrides, args.inputs = _split_overrides(list(args.inputs) + extra)
        if not args.inputs:
            parser.error("predict needs at least one image, folder or glob")
    if args.command in ("train", "eval", "export", "bench"):
        overrides, stray = _split_overrides(args.overrides)
        if stray:
            parser.error(f"{args.command}: expected KEY=VALUE overrides, got {stray}")
    try:
        check_device(getattr(args, "device", None))
        return args.func(args)
    except Exception as err:  # expected user errors -> one line; bugs keep their traceback
        if debug or not is_expected(err):
            raise
        print(f"sparsedet {args.command}: error: {one_line(err)}", file=sys.stderr)
        return exit_code(err)
    except KeyboardInterrupt:
        print(f"sparsedet {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.command == "train":
            from .engine.distributed import shutdown
            shutdown()


if __name__ == "__main__":
    sys.exit(main())
