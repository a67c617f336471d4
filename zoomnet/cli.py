"""The ``zoomnet`` command line: a thin layer over functions the tests call directly.

One ``add_<command>`` per command declares its flags; one ``_<command>`` calls the engine.
Errors a user can fix print one line, ``zoomnet: error: ...`` (the engine's message with its
options written as this command line's flags), and exit with status 2; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import signal
import sys
import threading
from pathlib import Path

from zoomnet import __version__
from zoomnet.data.generators import KINDS
from zoomnet.errors import UserError
from zoomnet.runtime.allocator import settle_heap


def strict_json(value) -> str:
    """JSON that every parser reads: NaN and infinities (an AUC of a one-class set, say)
    become ``null``.

    >>> strict_json({"auc": float("nan"), "n": [1.0, float("inf")]})
    '{"auc": null, "n": [1.0, null]}'
    """
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False)


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars only for a person watching: not with --quiet, nor into a pipe or file."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


# ---------------------------------------------------------------------------- the commands
def _doctor(args: argparse.Namespace) -> int:
    from zoomnet.runtime.doctor import print_report

    return print_report()


def _demo(args: argparse.Namespace) -> int:
    from zoomnet.demo import run_demo

    return run_demo(args.out, num=args.num, epochs=args.epochs, seed=args.seed)


def _train(args: argparse.Namespace) -> int:
    from zoomnet.config import load_config
    from zoomnet.runs import train_run

    config = load_config(args.config, args.set)
    if args.seed is not None:
        config.train.seed = args.seed
    train_run(config, args.train, args.val, args.out, resume=args.resume, device=args.device,
              progress=_progress(args), epochs=args.epochs, tensorboard=args.tensorboard, force=args.force)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from zoomnet.runs import evaluate_run

    m = evaluate_run(args.run, args.test, deterministic=args.deterministic, samples=args.samples,
                     seed=args.seed, device=args.device, progress=_progress(args), draw_sets=args.draw_sets)
    print(f"images: {m['images']}")
    print(f"accuracy: {m['accuracy']:.4f}")
    print(f"balanced accuracy: {m['balanced_accuracy']:.4f}")
    if "auc" in m:
        print(f"AUC: {m['auc']:.4f}")
    print("confusion (rows: true " + ", ".join(m["classes"]) + "):")
    for c, row in zip(m["classes"], m["confusion"]):
        print(f"  {c}: {row}")
    if "uncertain" in m:
        print(f"flagged uncertain (flip chance > 5 %): {m['uncertain']:.1%} of images; error rate "
              f"{m['uncertain_error']:.3f} flagged, {m['confident_error']:.3f} confident")
    print(strict_json(m))
    return 0


def _probe(args: argparse.Namespace) -> int:
    from zoomnet.runs import probe_run

    m = probe_run(args.run, args.manifest, args.per_image, args.seed, args.device, _progress(args),
                  "last" if args.last else "best")
    width = max(len(r) for r in m["rows"])
    print(f"sub-tiles cut from {m['images']} images; predicted class (columns: " + ", ".join(m["classes"]) + "):")
    for name, row in zip(m["rows"], m["counts"]):
        on = "sub-tiles that miss every object" if name == m["rows"][-1] else "on objects of images of this class"
        print(f"  {name:>{width}}: {row}  ({on})")
    print(f"object sub-tiles called their image's class: {m['object_accuracy']:.3f}")
    print(strict_json(m))
    return 0


def _emit_prediction(result: dict) -> None:
    print(strict_json(result), flush=True)
    if "heatmap" in result:  # on stderr, so that stdout stays one JSON line per image
        print(f"heatmap: {result['heatmap']}", file=sys.stderr, flush=True)


def _predict(args: argparse.Namespace) -> int:
    from zoomnet.metrics import csv_metrics, prediction_metrics
    from zoomnet.runs import predict_images

    inputs = list(args.images) + ([args.manifest] if args.manifest else [])
    if not inputs:
        raise UserError("predict: nothing to predict; give images, folders or manifest CSVs")
    draw_sets = "auto" if args.samples == "auto" else args.draw_sets
    results = predict_images(
        args.run, inputs, deterministic=args.deterministic, samples=None if args.samples == "auto" else args.samples,
        seed=args.seed, draw_sets=draw_sets,
        device=args.device, heatmaps=args.heatmaps, geojson=args.geojson, emit=_emit_prediction,
        progress=_progress(args), out_csv=args.out, workers=args.workers, heatmap_size=args.heatmap_size,
        attention_tiffs=args.attention_tiffs, batch=_batch_size(args.batch, args.device),
    )
    from zoomnet.runtime.distributed import rank_and_world

    if rank_and_world()[0] != 0:  # under torchrun: rank 0 reports the merged file
        return 0
    if args.out:  # the whole file's, this call's images and those of earlier calls
        metrics = csv_metrics(args.out) if Path(args.out).is_file() else None
    else:
        metrics = prediction_metrics(results, list(results[0]["probabilities"])) if results else None
    if metrics:
        summary = f"{metrics['images']} labelled images: accuracy {metrics['accuracy']:.4f}"
        if "auc" in metrics:
            summary += f", AUC {metrics['auc']:.4f}"
        print(summary, file=sys.stderr)
        print(strict_json({"metrics": metrics}))
    if args.out:
        print(f"predictions: {args.out}", file=sys.stderr)
    return 0


def _make_data(args: argparse.Namespace) -> int:
    if args.kind == "gigapixel":
        from zoomnet.data.generators.slides import write_gigapixel

        print(f"wrote {write_gigapixel(args.out, size=args.size or 50_000, seed=args.seed)}")
        return 0
    from zoomnet.data.generators import write_dataset

    if args.tile not in (256, 512) or args.level_downsample not in (2, 4):
        raise UserError(f"make-data --tile {args.tile} --level-downsample {args.level_downsample}: give a tile of 256 "
                        "or 512 px and levels at 2x or 4x")
    write_dataset(args.kind, args.out, num=args.num, size=args.size, seed=args.seed, tile=args.tile,
                  level_downsample=args.level_downsample)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from zoomnet.bench import run_bench

    if args.seeds < 1:
        raise UserError(f"bench --seeds {args.seeds}: give at least 1")
    run_bench(args.setting, models=args.models, repeats=args.repeats, skip_training=args.skip_training,
              seeds=args.seeds, work=args.work, overrides=args.set, epochs=args.epochs, num=args.num,
              size=args.size, cost_images=args.cost_images, out=args.csv, progress=not args.quiet)
    return 0


# ---------------------------------------------------------------------------- the flags
def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")


def _batch_size(batch: int | None, device: str) -> int:
    """``--batch``: as given, else 8 images a call on a GPU and 1 on a CPU (where one image's
    nets already fill the cores and a batch only adds memory)."""
    if batch is not None:
        return batch
    from zoomnet.runtime.device import resolve_device

    return 1 if resolve_device(device).type == "cpu" else 8


def _samples(text: str):
    """``--samples``: a whole number, or ``auto`` where the command takes it."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of draws (or auto)") from None


def _inference(p: argparse.ArgumentParser, auto: bool = False) -> None:
    p.add_argument("--deterministic", action="store_true", help="top-k instead of sampling")
    p.add_argument("--samples", type=_samples if auto else int,
                   help="draws N (default: the run's)" + ("; auto: draw sets of N/8 until the decision is settled"
                                                          if auto else ""))
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    _device(p)


def add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="versions, device, CUDA, OpenSlide and codecs: paste it into an issue report")
    p.set_defaults(func=_doctor)


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="make-data, train, evaluate and predict with heatmaps on tiny objects")
    p.add_argument("--out", default="demo-output", help="folder for the data, the run and the heatmaps")
    p.add_argument("--num", type=int, default=534, help="images in all (60%% train, 20%% val, 20%% test)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and sampling")
    p.set_defaults(func=_demo)


def add_train(sub) -> None:
    from zoomnet.config import available_presets

    p = sub.add_parser("train", help="train a model on manifests (CSV: path,label[,mask])")
    p.add_argument("--config", required=True,
                   help=f"a preset ({', '.join(available_presets())}) or a JSON file")
    p.add_argument("--train", required=True, help="training manifest CSV")
    p.add_argument("--val", help="validation manifest CSV")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="override config fields")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.add_argument("--force", action="store_true",
                   help="start afresh in an --out that holds a run (its files are removed; other files never are)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log metrics and heatmaps to RUN/tensorboard (pip install tensorboard)")
    _device(p)
    p.set_defaults(func=_train)


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a run on a manifest; the last line is JSON")
    p.add_argument("run", help="run folder")
    p.add_argument("test", help="manifest CSV")
    p.add_argument("--draw-sets", type=int, default=1,
                   help="independent draw sets per image (default 1): with 2 or more, the error rates of images "
                        "flagged uncertain and of confident ones")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _inference(p)
    p.set_defaults(func=_evaluate)


def add_probe(sub) -> None:
    p = sub.add_parser("probe", help="what f and g call single sub-tiles on and off the objects of a "
                       "manifest with masks: whether f knows the objects when accuracy is flat")
    p.add_argument("run", help="run folder")
    p.add_argument("manifest", help="manifest CSV with a mask column")
    p.add_argument("--per-image", type=int, default=4, help="sub-tiles on objects and off them, each, per image")
    p.add_argument("--seed", type=int, default=0, help="seed of where the sub-tiles are cut")
    p.add_argument("--last", action="store_true", help="the last epoch's weights, not the best epoch's")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _device(p)
    p.set_defaults(func=_probe)


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict images, folders of slides or manifests; one JSON line per image")
    p.add_argument("run", help="run folder")
    p.add_argument("images", nargs="*", metavar="INPUT",
                   help="image files, folders (searched recursively for images and slides) or CSV manifests "
                        "(column path, optionally label: then the metrics are reported too)")
    p.add_argument("--manifest", help="a CSV of images to predict (column path, optionally label)")
    p.add_argument("--out", help="append predictions to this CSV as they finish; images already in it are skipped")
    p.add_argument("--heatmaps", help="folder for <image stem>.png pictures of where the model looked")
    p.add_argument("--heatmap-size", type=int, default=2048, help="long side of the heatmap pictures (default 2048)")
    p.add_argument("--attention-tiffs", help="folder for <image stem>.attention.tif: the attention as a pyramidal "
                                             "TIFF at the file's level-0 size, to overlay in a slide viewer")
    p.add_argument("--geojson", help="folder for <image stem>.geojson (QuPath: level-0 pixel coordinates)")
    p.add_argument("--workers", type=int, default=2, help="threads opening the next images (default 2)")
    p.add_argument("--batch", type=int, default=None,
                   help="images of one size predicted per call (default: 8 on a GPU, 1 on a CPU)")
    p.add_argument("--draw-sets", type=int, default=1,
                   help="independent draw sets per image (default 1): with 2 or more each prediction gets its "
                        "standard errors and the chance that another estimate flips its class")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _inference(p, auto=True)
    p.set_defaults(func=_predict)


def add_bench(sub) -> None:
    from zoomnet.bench import MODELS, SETTINGS

    p = sub.add_parser("bench", help="accuracy, FLOPs, peak memory and time per image of Zoom-In, ATS and CNNs (CSV)")
    p.add_argument("setting", help=f"one of: {', '.join(SETTINGS)}")
    p.add_argument("--skip-training", action="store_true",
                   help="untrained weights, one image: cost columns only, in seconds")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per model (default 3)")
    p.add_argument("--models", nargs="*", help=f"a subset of: {' '.join(MODELS)}")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides for every model (ablations), e.g. model.samples=10")
    p.add_argument("--epochs", type=int, help="training epochs (default per setting)")
    p.add_argument("--num", type=int, help="images in the synthetic set (default per setting)")
    p.add_argument("--size", type=int, help="image side (default per setting; smaller for smoke runs)")
    p.add_argument("--work", default="bench-runs", help="folder for the data and runs (reused when present)")
    p.add_argument("--cost-images", type=int, default=8, help="test images the trained cost columns average")
    p.add_argument("--csv", help="also write the output to this file")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per image after warm-up (median)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_bench)


def add_make_data(sub) -> None:
    p = sub.add_parser("make-data", help="write a synthetic data set: images, masks and train/val/test CSVs")
    p.add_argument("kind", choices=[*KINDS, "gigapixel"],
                   help="which set (colon-cancer, traffic-signs, fmow, camelyon16: stand-ins with the geometry of "
                   "the paper's sets; slides: whole slides at real sizes; gigapixel: one pyramidal TIFF slide, OUT "
                   "a .tif path or a folder)")
    p.add_argument("out", help="folder to write")
    p.add_argument("--num", type=int, help="number of images in all (default per set)")
    p.add_argument("--size", type=int, help="image side in pixels (default per set; slides: the widest slide)")
    p.add_argument("--tile", type=int, default=512, help="slides: JPEG tile size, 256 or 512 (default 512)")
    p.add_argument("--level-downsample", type=int, default=4,
                   help="slides: the pyramid's step, 4 (as Aperio SVS) or 2 (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.set_defaults(func=_make_data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoomnet", description="Classify very large images by zooming in.")
    parser.add_argument("--version", action="version", version=f"zoomnet {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_doctor, add_demo, add_train, add_evaluate, add_probe, add_predict, add_bench, add_make_data):
        add(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler ending a job, ``kill``), handled as Ctrl-C is."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def _after_interrupt(args: argparse.Namespace, argv: list[str]) -> str:
    """What an interrupted command leaves, and the command that continues it."""
    if args.command == "train":
        if (Path(args.out) / "last.safetensors").is_file():
            again = [a for a in argv if a != "--force"] + ([] if "--resume" in argv else ["--resume"])
            return f"{args.out} keeps its last finished epoch; continue with: {shlex.join(['zoomnet', *again])}"
        return f"no epoch had finished; start again with: {shlex.join(['zoomnet', *argv])}"
    if args.command == "predict" and args.out:
        return f"{args.out} holds the images finished so far; finish with: {shlex.join(['zoomnet', *argv])}"
    return "nothing was left half-written"


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    settle_heap()  # the same pages for every call from the first (zoomnet.runtime.allocator)
    handler = None
    if threading.current_thread() is threading.main_thread():
        handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"zoomnet: error: {exc.for_cli()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"zoomnet: {what}; {_after_interrupt(args, argv)}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
