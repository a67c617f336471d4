"""Runs on disk: train from manifests into a run folder and resume it (:mod:`.training`),
use a finished run (:mod:`.loading`), predict cohorts (:mod:`.predict`); the folder's files
and their order (:mod:`.folder`)."""

from zoomnet.runs.folder import RUN_FILES, epoch_score, first_difference, prepare_run_folder, read_run_config
from zoomnet.runs.loading import check_image_sizes, evaluate_run, load_run, open_run_image, probe_run
from zoomnet.runs.predict import expand_inputs, predict_images
from zoomnet.runs.training import train_run
from zoomnet.runtime.device import resolve_device

__all__ = [
    "RUN_FILES",
    "check_image_sizes",
    "epoch_score",
    "evaluate_run",
    "expand_inputs",
    "first_difference",
    "load_run",
    "open_run_image",
    "predict_images",
    "prepare_run_folder",
    "probe_run",
    "read_run_config",
    "resolve_device",
    "train_run",
]
