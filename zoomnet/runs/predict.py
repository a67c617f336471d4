"""``predict_images``: a run's predictions on images, folders of slides and manifests, with
the pictures and files of where it looked, appended to a CSV as they come so that a cohort
resumes where it stopped."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from zoomnet.checkpoint import atomic_write_bytes
from zoomnet.config import RunConfig
from zoomnet.data.examples import Example
from zoomnet.data.manifest import read_manifest
from zoomnet.data.prefetch import prefetched
from zoomnet.errors import OUT_CSV, ImageError, Option, UserError
from zoomnet.runtime.files import writable_folder
from zoomnet.model import view_size
from zoomnet.outputs import geojson_of, render_heatmap, write_attention_tiff
from zoomnet.runs.loading import check_draws, check_image_sizes, load_run
from zoomnet.runtime.allocator import settle_heap
from zoomnet.runtime import distributed
from zoomnet.runtime.device import OUT_OF_MEMORY, resolve_device
from zoomnet.sources.base import io_counts
from zoomnet.sources.lazy import LazyImage
from zoomnet.sources.open import PLAIN, TIFF
from zoomnet.sources.slide import VENDOR
from zoomnet.uncertainty import draw_set_statistics, predict_draw_sets, predict_until_settled

# --samples auto: draw sets of ceil(N / AUTO_PART) draws, two and then one at a time, at most eight
# (about N at most); docs/experiments/draws.md measured N/8 against N/4 and the fixed N
AUTO_PART = 8


def expand_inputs(inputs: list[str]) -> list[tuple[str, Path, str]]:
    """Images to predict, as ``(name as given, path, label or "")``: image files as they
    are, folders searched recursively for images and slides (by suffix, sorted), CSV
    manifests with a ``path`` column and optionally ``label``.

    Raises:
        UserError: an input that does not exist, or a folder without images.
    """
    known = PLAIN | TIFF | VENDOR
    out: list[tuple[str, Path, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in known)
            if not found:
                raise UserError(f"{item}: a folder with no images ({', '.join(sorted(known))}) in it or below")
            out += [(str(f), f, "") for f in found]
        elif path.suffix.lower() == ".csv":
            out += [(r.given, r.path, r.label) for r in read_manifest(path, labels=False)]
        else:
            out.append((item, path, ""))
    return out


def output_name(given: str, taken: dict[str, str]) -> str:
    """A file stem for an image's heatmap and GeoJSON, unique within one prediction run
    (two ``slide.svs`` in different folders get ``slide`` and ``slide-<hash>``).

    >>> taken = {}
    >>> output_name("a/slide.svs", taken), output_name("b/slide.ome.tif", taken)[:6]
    ('slide', 'slide-')
    """
    stem = Path(given).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = Path(given).stem
    if taken.setdefault(stem, given) != given:
        stem = f"{stem}-{hashlib.sha1(given.encode()).hexdigest()[:8]}"
        taken[stem] = given
    return stem


def part_files(out_csv: Path) -> list[Path]:
    """The CSVs the processes of a sharded run write beside ``out_csv`` until the merge."""
    return sorted(out_csv.parent.glob(f".{out_csv.name}.part-*.csv"))


def _merge_parts(out_csv: Path, header: list[str], order: list[str]) -> None:
    """Fold the parts into ``out_csv`` (its rows first, then the parts' in the inputs' order;
    a path once), by a rename, then remove the parts."""
    parts = part_files(out_csv)
    if not parts:
        return
    rows: dict[str, list[str]] = {}
    for path in ([out_csv] if out_csv.is_file() else []) + parts:
        with path.open(newline="") as fh:
            reader = csv.reader(fh)
            if next(reader, None) != header:
                continue
            for row in reader:
                if len(row) == len(header):
                    rows.setdefault(row[0], row)
    rank = {given: i for i, given in enumerate(order)}
    ordered = sorted(rows.values(), key=lambda r: rank.get(r[0], len(rank)))
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *ordered])
    atomic_write_bytes(out_csv, buf.getvalue().encode())
    for path in parts:
        path.unlink(missing_ok=True)


def done_paths(out_csv: Path, header: list[str]) -> set[str]:
    """Paths already in a predictions CSV written with ``header`` (for resuming)."""
    if not out_csv.is_file() or out_csv.stat().st_size == 0:
        return set()
    with out_csv.open(newline="") as fh:
        reader = csv.reader(fh)
        found = next(reader, [])
        if found != header:
            raise UserError(
                f"{out_csv}: exists with other columns ({', '.join(found[:6])}...); give a new {{out}}, "
                "or delete it to start over", out=OUT_CSV,
            )
        return {row[0] for row in reader if len(row) == len(header)}


@dataclass
class _Outputs:
    """Where the pictures and files of one prediction run go (None: not asked for)."""

    heatmaps: Path | None = None
    geojson: Path | None = None
    attention_tiffs: Path | None = None
    heatmap_size: int = 2048
    names: dict[str, str] = field(default_factory=dict)

    def asked(self) -> bool:
        return any(f is not None for f in (self.heatmaps, self.geojson, self.attention_tiffs))

    def missing(self, given: str) -> bool:
        """Whether an output asked for this image is not on disk (its stem registered)."""
        stem = output_name(given, self.names)
        files = [(self.heatmaps, f"{stem}.png"), (self.geojson, f"{stem}.geojson"),
                 (self.attention_tiffs, f"{stem}.attention.tif")]
        return any(folder is not None and not (folder / name).is_file() for folder, name in files)

    def write(self, model, config: RunConfig, src, out, given: str, result: dict, probs: list[float],
              index: int = 0) -> None:
        """Write what was asked for image ``index`` of ``out``; record each file's path in ``result``."""
        if not out.levels:  # the CNN baseline looks everywhere
            return
        stem = output_name(given, self.names)
        strides = [lv.cell_stride() for lv in config.model.levels]
        if self.heatmaps is not None:
            title = f"{given}: {result['label']} (p = {max(probs):.2f}"
            if "uncertainty" in result:
                u = result["uncertainty"]
                title += f" ± {u['standard_error'][result['label']]:.2f}, flip {u['flip_probability']:.2f}"
            title += ")"
            picture = render_heatmap(src, out, index, self.heatmaps / f"{stem}.png", strides, title,
                                     display=self.heatmap_size, tissue=config.model.tissue_mask)
            result["heatmap"] = str(picture)
        if self.attention_tiffs is not None:
            target = self.attention_tiffs / f"{stem}.attention.tif"
            result["attention_tiff"] = str(write_attention_tiff(src, out, index, target, strides))
        if self.geojson is not None:
            self.geojson.mkdir(parents=True, exist_ok=True)
            target = self.geojson / f"{stem}.geojson"
            collection = geojson_of(out, index, src, config.data.classes, probs, strides, given)
            if "uncertainty" in result:
                collection["properties"]["uncertainty"] = result["uncertainty"]
            atomic_write_bytes(target, json.dumps(collection).encode())
            result["geojson"] = str(target)


def _predict_one(model, config: RunConfig, src, views, given: str, label: str, tick: float, outputs: _Outputs,
                 draw_sets: int | str = 1, **draws) -> dict:
    """One image's result: its class, probabilities, time, what it read, its files, and with
    several draw sets (or ``"auto"``) how sure the prediction is."""
    classes = config.data.classes
    stats = None
    if draw_sets == 1 or config.model.kind in ("cnn", "mil"):  # the baselines do not sample: nothing to be unsure of
        out = model.predict([src], views=views, **draws)
        probs = torch.softmax(out.logits.float(), dim=1)[0].tolist()
    else:
        n = draws["samples"] or config.model.samples
        if draw_sets == "auto":  # rounds of an eighth of the run's draws until the decision is settled
            n = max(1, -(-n // AUTO_PART))
            logits, out = predict_until_settled(model, src, views, n, draws["generator"])
        else:
            logits, out = predict_draw_sets(model, src, views, int(draw_sets), draws["samples"], draws["generator"])
        stats = draw_set_statistics(logits)
        probs = stats.probabilities.tolist()
    result = _result(classes, src, given, label, probs, time.perf_counter() - tick)
    if stats is not None:
        result["uncertainty"] = {
            "draw_sets": stats.sets, "draws": stats.sets * n, "flip_probability": stats.flip,
            "standard_error": dict(zip(classes, stats.standard_error.tolist())), "settled": stats.settled,
        }
    outputs.write(model, config, src, out, given, result, probs)
    return result


def _result(classes: list[str], src, given: str, label: str, probs: list[float], seconds: float) -> dict:
    """One image's result dict: its class, probabilities, time and what it read."""
    pixels, read = io_counts(src)
    result = {"path": given, "label": classes[max(range(len(probs)), key=probs.__getitem__)],
              "probabilities": dict(zip(classes, probs)), "seconds": seconds, "pixels_read": pixels,
              "bytes_read": read}
    if label:
        result["true_label"] = label
    return result


def _predict_group(model, config: RunConfig, group: list[tuple], outputs: "_Outputs", **draws) -> list[dict]:
    """Images of one size, each with its level-1 view read, predicted in one call of the
    model (each net once per level for the whole group, as far as the chunks allow); the
    call's time shared among them."""
    tick = time.perf_counter()
    sources = [src for _, _, src, _ in group]
    out = model.predict(sources, views=torch.cat([v for _, _, _, v in group]), **draws)
    probs = torch.softmax(out.logits.float(), dim=1).tolist()
    seconds = (time.perf_counter() - tick) / len(group)
    results = []
    for b, (given, label, src, _) in enumerate(group):
        results.append(_result(config.data.classes, src, given, label, probs[b], seconds))
        outputs.write(model, config, src, out, given, results[-1], probs[b], index=b)
    return results


def _open(item: tuple[str, Path, str], model, config: RunConfig, where: str):
    """In a worker thread: open an image and read its level-1 view (a view read in strips,
    huge, is left to the model)."""
    given, path, _ = item
    src = LazyImage(path, given, config.data.fill, config.data.target_mpp, config.data.max_pixels)
    check_image_sizes([Example(src, 0, None, given)], config.model, where)
    views = None
    if config.model.kind != "cnn":
        vs = view_size(config.model.levels[0].scale, src.height, src.width)
        if not (config.model.strip_rows and vs[0] > config.model.strip_rows):
            views = model.read_views([src])
    return src, views


def _check_draw_sets(draw_sets, deterministic: bool) -> None:
    """Refuse a number of draw sets that is not a whole number >= 1 or ``"auto"``, and draw
    sets without sampling (deterministic draws are the same every time)."""
    option = Option(f"draw_sets={draw_sets!r}", f"--draw-sets {draw_sets}")
    if draw_sets != "auto" and (isinstance(draw_sets, bool) or not isinstance(draw_sets, int) or draw_sets < 1):
        raise UserError("{sets}: give a whole number of draw sets >= 1", sets=option)
    if deterministic and draw_sets != 1:
        raise UserError("{sets}: deterministic draws are the same every time; leave out {det} to measure how sure "
                        "a prediction is", sets=option, det=Option("deterministic=True", "--deterministic"))


def _check_outputs(out_csv, heatmaps, geojson, attention_tiffs, workers: int, heatmap_size: int,
                   batch: int = 1) -> None:
    """Refuse, before any work, outputs that cannot be written and counts out of range."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError("{batch}: give a whole number of images >= 1", batch=Option(f"batch={batch!r}", f"--batch {batch}"))
    if workers < 1:
        raise UserError("{workers}: give at least 1 thread", workers=Option(f"workers={workers}", f"--workers {workers}"))
    if heatmap_size < 64:
        raise UserError("{size}: give at least 64 px", size=Option(f"heatmap_size={heatmap_size}",
                                                                    f"--heatmap-size {heatmap_size}"))
    for name, flag, folder in (("heatmaps", "--heatmaps", heatmaps), ("geojson", "--geojson", geojson),
                               ("attention_tiffs", "--attention-tiffs", attention_tiffs)):
        if folder is not None:
            writable_folder(Path(folder), Option(name, flag))
    if out_csv is not None:
        out_csv = Path(out_csv)
        if out_csv.is_dir():
            raise UserError(f"{{out}} {out_csv}: a folder; give a CSV file to write the predictions to", out=OUT_CSV)
        writable_folder(out_csv.parent if str(out_csv.parent) else Path("."), OUT_CSV)


def _open_csv(out_csv: Path | None, items: list, images: list[str], header: list[str]) -> set[str]:
    """Check a predictions CSV to append to; return the paths it already holds."""
    if out_csv is None:
        return set()
    if any(out_csv.resolve() == p.resolve() for _, p, _ in items) or any(
        Path(i).suffix.lower() == ".csv" and out_csv.resolve() == Path(i).resolve() for i in images
    ):
        raise UserError(f"{{out}} {out_csv}: that is one of the inputs; write the predictions to a new file",
                        out=OUT_CSV)
    done = done_paths(out_csv, header)
    for part in part_files(out_csv):  # a sharded run's parts not yet merged (a process was killed)
        done |= done_paths(part, header)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    return done


class _Cohort:
    """The results of a prediction run as they come: appended to the CSV (flushed, so a
    killed run loses at most the image in hand), counted on the progress bar, the images
    that could not be read set aside."""

    def __init__(self, out_csv: Path | None, header: list[str], total: int, todo: int, progress: bool):
        self.fh = out_csv.open("a", newline="") if out_csv is not None else None
        self.writer = csv.writer(self.fh) if self.fh else None
        if self.writer and out_csv.stat().st_size == 0:  # a new file (or one a crash left empty)
            self.writer.writerow(header)
            self.fh.flush()
        self.bar = tqdm(total=total, initial=total - todo, desc="predict", unit="image", disable=not progress)
        self.results: list[dict] = []
        self.failed: list[str] = []
        self.slowest = (0.0, "")

    def __enter__(self) -> "_Cohort":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.fh:
            self.fh.close()

    def skip(self, given: str, exc: Exception) -> None:
        self.failed.append(given)
        print(f"zoomnet: skipped {exc}", file=sys.stderr, flush=True)
        self.bar.update(1)

    def report(self, result: dict, redo: set[str], emit: Callable[[dict], None] | None) -> None:
        """A result added (its row written unless it was predicted before) and emitted."""
        self.add(result, result.get("true_label", ""), row=result["path"] not in redo)
        if emit:
            emit(result)

    def add(self, result: dict, label: str, row: bool = True) -> None:
        if self.writer and row:
            u = result.get("uncertainty")
            extra = [] if u is None else [*[f"{v:.6f}" for v in u["standard_error"].values()],
                                          f"{u['flip_probability']:.6f}", str(u["draws"])]
            self.writer.writerow([result["path"], label, result["label"],
                                  *[f"{p:.6f}" for p in result["probabilities"].values()], f"{result['seconds']:.3f}",
                                  *extra])
            self.fh.flush()
        self.results.append(result)
        self.slowest = max(self.slowest, (result["seconds"], Path(result["path"]).name))
        self.bar.set_postfix_str(f"slowest {self.slowest[1]} {self.slowest[0]:.1f}s", refresh=False)
        self.bar.update(1)


def predict_images(
    run_dir: str | Path, images: list[str], deterministic: bool = False, samples: int | None = None,
    seed: int = 0, device: str = "cpu", heatmaps: str | Path | None = None, geojson: str | Path | None = None,
    emit: Callable[[dict], None] | None = None, progress: bool = False, out_csv: str | Path | None = None,
    workers: int = 2, heatmap_size: int = 2048, attention_tiffs: str | Path | None = None,
    shard: tuple[int, int] | None = None, draw_sets: int | str = 1, batch: int = 1,
) -> list[dict]:
    """Predict images, folders and manifests; one result dict per image (also passed to
    ``emit`` as it comes).

    With ``out_csv`` each result is appended to that CSV as soon as it is known, and images
    already in it are skipped, so a crashed or interrupted cohort resumes where it stopped.
    ``workers`` threads open the next files and read their level-1 views while the model
    works on the current one. A result's ``true_label`` is the manifest's label, if any.
    ``heatmaps`` pictures are at most ``heatmap_size`` px on the long side;
    ``attention_tiffs`` get a pyramidal TIFF of the attention at the file's level-0 size.

    ``draw_sets``: R > 1 independent draw sets per image (in one batch) give each prediction
    its standard errors and the chance that another estimate flips its class
    (:mod:`zoomnet.uncertainty`); ``"auto"`` draws sets of an eighth of the run's draws until
    the decision is settled (at most 8).

    ``batch``: images of one size predicted together, each net once per level for the group
    (the draws follow the same laws, not the same numbers as one at a time).

    Under torchrun (or with ``shard=(rank, world)``) each process predicts every
    ``world``-th input from its ``rank``-th on, appends to a part file beside ``out_csv``,
    and rank 0 folds the parts into ``out_csv`` once every process is done; a rerun skips
    what any part or the CSV holds, so a process killed midway loses nothing.

    Raises:
        UserError: an unreadable input (with one image), or an ``out_csv`` that is an input.
    """
    settle_heap()
    check_draws(samples)
    _check_draw_sets(draw_sets, deterministic)
    _check_outputs(out_csv, heatmaps, geojson, attention_tiffs, workers, heatmap_size, batch)
    rank, world = shard or distributed.rank_and_world()
    if world > 1 and device != "cpu":
        device = str(distributed.local_device(resolve_device(device), world))
    model, config = load_run(run_dir, device)
    items = expand_inputs(images)
    header = _header(config.data.classes, draw_sets)
    out_csv = Path(out_csv) if out_csv is not None else None
    done = _open_csv(out_csv, items, images, header)
    outputs = _Outputs(*(Path(p) if p is not None else None for p in (heatmaps, geojson, attention_tiffs)),
                       heatmap_size=heatmap_size)
    todo, redo = _share(items, done, outputs, rank, world, out_csv)
    draws = dict(deterministic=deterministic, samples=samples, generator=torch.Generator().manual_seed(seed))
    predict = partial(_predict_one, model, config, outputs=outputs, draw_sets=draw_sets, **draws)
    prepare = partial(_open, model=model, config=config, where=f"the model in {run_dir}")
    target = out_csv if out_csv is None or world == 1 else out_csv.with_name(f".{out_csv.name}.part-{rank}.csv")
    group = partial(_predict_group, model, config, outputs=outputs, **draws) if batch > 1 and draw_sets == 1 else None
    with _Cohort(target, header, len(items) + len(redo), len(todo), progress) as cohort:
        opened = prefetched(prepare, todo, workers=workers, ahead=workers + batch, name="zoomnet-open")
        _predict_opened(opened, batch, group, predict, cohort, len(items) == 1, device, run_dir,
                        partial(cohort.report, redo=redo, emit=emit))
    _finish(cohort, out_csv, header, [it[0] for it in items], rank, world)
    return cohort.results


def _predict_opened(opened, batch: int, group: Callable | None, predict: Callable, cohort: "_Cohort", alone: bool,
                    device: str, run_dir, report: Callable[[dict], None]) -> None:
    """The opened inputs predicted in groups of ``batch`` (where ``group`` is given) or one
    at a time, each result reported as it comes."""
    if group is not None:
        _in_groups(opened, batch, group, predict, cohort, alone, device, run_dir, report)
        return
    for (given, _, label), prepared in opened:
        result = _predict_prepared(predict, prepared, given, label, cohort, alone, device, run_dir)
        if result is not None:
            report(result)


def _in_groups(opened, batch: int, group: Callable, predict: Callable, cohort: "_Cohort", alone: bool, device: str,
               run_dir, report: Callable[[dict], None]) -> None:
    """Opened inputs predicted ``batch`` at a time: consecutive ones of one size whose
    level-1 views were read (a view read in strips goes alone). A group that fails (a
    damaged tile) is predicted image by image, so that only the damaged one is set aside."""
    pending: list[tuple] = []

    def run() -> None:
        if not pending:
            return
        try:
            results = group(pending) if len(pending) > 1 else None
        except (ImageError, UserError):
            results = None
        except OUT_OF_MEMORY as exc:
            raise UserError(f"out of memory on {device} predicting {len(pending)} images at once "
                            f"({str(exc).splitlines()[0][:120]}); give a smaller --batch") from None
        if results is None:  # alone, or again one by one
            results = []
            for given, label, src, views in pending:
                try:
                    results.append(predict(src, views, given, label, time.perf_counter()))
                except (ImageError, UserError) as exc:  # a damaged tile a sub-tile needed
                    if alone:
                        raise
                    cohort.skip(given, exc)
        for result in results:
            report(result)
        pending.clear()

    for (given, _, label), prepared in opened:
        try:
            src, views = prepared.result()
        except (ImageError, UserError) as exc:
            if alone:
                raise
            cohort.skip(given, exc)
            continue
        size = (src.height, src.width)
        if pending and (views is None or len(pending) == batch or (pending[0][2].height, pending[0][2].width) != size):
            run()
        pending.append((given, label, src, views))
        if views is None:
            run()
    run()


def _finish(cohort: _Cohort, out_csv: Path | None, header: list[str], order: list[str], rank: int, world: int) -> None:
    """Once every process has written its part, rank 0 folds the parts into ``out_csv``;
    then the inputs that could not be read are reported.

    Raises:
        UserError: some inputs could not be read.
    """
    distributed.barrier(world)  # every process has written its part
    if out_csv is not None and rank == 0:
        _merge_parts(out_csv, header, order)
    if cohort.failed:
        raise UserError(
            f"{len(cohort.failed)} of {len(order)} images could not be read (first: {cohort.failed[0]}); the others "
            + (f"are in {out_csv}; fix or remove those files and run the same command to finish" if out_csv else "are above")
        )


def _header(classes: list[str], draw_sets: int | str) -> list[str]:
    """The predictions CSV's columns (with the uncertainty's where draw sets are asked for)."""
    header = ["path", "true_label", "predicted", *[f"p_{c}" for c in classes], "seconds"]
    if draw_sets != 1:
        header += [*[f"se_{c}" for c in classes], "flip", "draws"]
    return header


def _share(items: list, done: set[str], outputs: _Outputs, rank: int, world: int,
           out_csv: Path | None) -> tuple[list, set[str]]:
    """This process's inputs to predict, and those among them predicted before whose pictures
    or files asked for now are missing (written again, their rows kept)."""
    for given, _, _ in items:  # every image's file stem, as the first run named them
        output_name(given, outputs.names)
    redo = {it[0] for it in items if it[0] in done and outputs.asked() and outputs.missing(it[0])}
    # this process's share: by the inputs' order, so that every process agrees whatever it reads
    todo = [it for i, it in enumerate(items) if i % world == rank and (it[0] not in done or it[0] in redo)]
    redo &= {it[0] for it in todo}
    if done:
        print(f"zoomnet: {len(done & {it[0] for it in items})} images already in {out_csv} skipped"
              + (f"; {len(redo)} of them lacked the pictures or files asked for now: written (their rows kept)"
                 if redo else ""), file=sys.stderr, flush=True)
    return todo, redo


def _predict_prepared(predict: Callable, prepared, given: str, label: str, cohort: _Cohort, alone: bool,
                      device: str, run_dir) -> dict | None:
    """One opened input predicted; None where it could not be read and was set aside (raised
    where it is the only input)."""
    tick = time.perf_counter()
    try:
        src, views = prepared.result()
        return predict(src, views, given, label, tick)
    except (ImageError, UserError) as exc:  # opening it, or a damaged tile a sub-tile needed
        if alone:
            raise
        cohort.skip(given, exc)
        return None
    except OUT_OF_MEMORY as exc:
        raise UserError(f"{given}: out of memory on {device} ({str(exc).splitlines()[0][:120]}); lower "
                        f"model.chunk, model.view_chunk or model.strip_rows in {run_dir}/config.json (they "
                        "change the memory, not the weights), or predict on the CPU; the "
                        "images finished so far are kept in the CSV") from None
