"""Score generated videos against real ones: the report of evaluate.py and of the reconstruction.

The report (JSON) has one entry per computed metric (``l1``, ``akd``, ``mkr``, ``aed``), each
``{'definition', 'units', 'mean', 'frames', 'skipped_frames', 'per_video': {name: {'mean', 'frames',
'skipped_frames'}}}`` (means pool the scored frames of all videos, see metrics.py), and ``compared``:
the folders, the number of videos and frames, the frame size, the domain, each extractor with its
weight files (path, bytes, sha256; or random), and the checkpoint when there is one.
"""
import logging
import os

import numpy as np
from tqdm import tqdm

from configuration import ConfigError
from evaluation.extractors import METRIC_ROLES, build_extractors, weight_keys
from evaluation.metrics import (
    DEFINITIONS,
    METRICS,
    aed_frames,
    akd_frames,
    format_mean,
    l1_frames,
    mkr_frames,
    summarise,
)
from evaluation.video import list_videos, read_pair
from evaluation.weights import resolve_weight_file
from frames_dataset import DatasetError

LOGGER = logging.getLogger(__name__)

DOMAINS = ("face", "body")


def parse_metrics(metrics, option="--metrics"):
    """A tuple of metric names from a list or a comma-separated string; unknown names are an error."""
    if isinstance(metrics, str):
        metrics = [name.strip() for name in metrics.split(",") if name.strip()]
    names = []
    for name in metrics:
        if name not in METRICS:
            raise ConfigError(f"{option}: unknown metric '{name}' (choose from {', '.join(METRICS)})")
        if name not in names:
            names.append(name)
    if not names:
        raise ConfigError(f"{option}: no metric given (choose from {', '.join(METRICS)})")
    return tuple(names)


def check_metrics(metrics, domain, option="--metrics"):
    """A domain that can compute ``metrics`` (MKR is defined for body keypoints only)."""
    if domain not in DOMAINS:
        raise ConfigError(f"{option}: domain must be face or body, got {domain!r}")
    if "mkr" in metrics and domain != "body":
        raise ConfigError(f"{option}: mkr needs body keypoints (domain body); face landmarks are found all "
                          f"together or not at all")


def resolve_weights(domain, metrics, weights, allow_random_weights, option="eval_params.weights"):
    """{key: existing path or None (random)} of the files ``metrics`` need; a missing one is an error."""
    return {key: resolve_weight_file(key, (weights or {}).get(key), allow_random_weights, option)
            for key in weight_keys(domain, metrics)}


def check_eval_config(config, needs_weights, path="<config>"):
    """Start-up check of ``eval_params``: metric names, the domain, and (``needs_weights``) the weight
    files, so that a run that evaluates at its end fails at its start. Returns the metrics."""
    params = config["eval_params"]
    option = f"{path}: eval_params.metrics"
    metrics = parse_metrics(params["metrics"], option)
    check_metrics(metrics, params["domain"], option)
    if needs_weights:
        resolve_weights(params["domain"], metrics, params["weights"], params["allow_random_weights"],
                        f"{path}: eval_params.weights")
    return metrics


def _units(metric, image_size, domain):
    size = "x".join(str(v) for v in image_size) if image_size else "?"
    if metric == "l1":
        return "mean absolute difference of pixel values in [0, 1]"
    if metric == "akd":
        return f"pixels of the {size} frames (mean |dx|, |dy|)"
    if metric == "mkr":
        return "fraction of the real frame's keypoints"
    embedding = "OpenFace 128-d unit-norm (range [0, 4])" if domain == "face" else "re-ID 2048-d un-normalised"
    return f"squared L2 distance of {embedding} embeddings"


class Evaluator:
    """The extractors of one evaluation and the per-frame metric values of (real, generated) pairs."""

    def __init__(self, metrics, domain, weight_files, device="cpu", batch_size=16):
        self.metrics = parse_metrics(metrics)
        check_metrics(self.metrics, domain)
        self.domain = domain
        self.extractors = build_extractors(domain, self.metrics, weight_files, device, batch_size)
        self.random_weights = sorted(key for key, path in weight_files.items() if path is None)

    def score(self, real, generated):
        """{metric: per-frame values (NaN = not scored)} and skip counts of uint8 (T, H, W, 3) frames."""
        values, skipped = {}, {}
        if "l1" in self.metrics:
            values["l1"] = l1_frames(real, generated)
        if any(METRIC_ROLES[m] == "keypoints" for m in self.metrics):
            extractor = self.extractors["keypoints"]
            real_points, real_found = extractor(real)
            generated_points, generated_found = extractor(generated)
            skipped["frames_without_keypoints_in_real"] = int((~real_found.any(axis=1)).sum())
            skipped["frames_without_keypoints_in_generated"] = int((~generated_found.any(axis=1)).sum())
            if "akd" in self.metrics:
                values["akd"] = akd_frames(real_points, real_found, generated_points, generated_found)
            if "mkr" in self.metrics:
                values["mkr"] = mkr_frames(real_found, generated_found)
        if "aed" in self.metrics:
            extractor = self.extractors["identity"]
            values["aed"] = aed_frames(extractor(real), extractor(generated))
            if not np.all(np.isfinite(values["aed"])):
                raise ValueError(f"aed: {extractor.name} gave non-finite embeddings (wrong weight file?)")
        return values, skipped

    def describe(self):
        return {role: extractor.describe() for role, extractor in self.extractors.items()}


def match_videos(real_dir, generated_dir):
    """[(key, real path, generated path)] for every generated video, and the unmatched real keys."""
    real = list_videos(real_dir)
    generated = list_videos(generated_dir)
    missing = [key for key in generated if key not in real]
    if missing:
        raise DatasetError(f"{os.path.join(generated_dir, os.path.basename(generated[missing[0]]))}: no real video "
                           f"'{missing[0]}' in {real_dir} ({len(missing)} generated videos unmatched)")
    return [(key, real[key], generated[key]) for key in generated], [key for key in real if key not in generated]


def evaluate_folders(real_dir, generated_dir, metrics, domain="face", weight_files=None, device="cpu",
                     batch_size=16, frame_shape=None, progress=True, evaluator=None):
    """Score every generated video of ``generated_dir`` against its real video; returns the report.

    weight_files: {key: resolved path or None (random)} (see :func:`resolve_weights`).
    """
    evaluator = evaluator or Evaluator(metrics, domain, weight_files or {}, device, batch_size)
    pairs, unmatched = match_videos(real_dir, generated_dir)
    if unmatched:
        LOGGER.warning("%d real videos of %s have no generated video in %s (e.g. %s); they are not scored",
                       len(unmatched), real_dir, generated_dir, unmatched[0])
    per_metric = {metric: {} for metric in evaluator.metrics}
    skipped_totals = {}
    sizes = set()
    total_frames = 0
    for key, real_path, generated_path in tqdm(pairs, desc="evaluation", unit="video", disable=not progress):
        real, generated = read_pair(real_path, generated_path, frame_shape)
        sizes.add(tuple(real.shape[1:3]))
        total_frames += real.shape[0]
        values, skipped = evaluator.score(real, generated)
        for metric, frame_values in values.items():
            per_metric[metric][key] = frame_values
        for reason, count in skipped.items():
            skipped_totals[reason] = skipped_totals.get(reason, 0) + count
    image_size = list(next(iter(sizes))) if len(sizes) == 1 else sorted(list(size) for size in sizes)
    report = {}
    for metric in evaluator.metrics:
        summary = summarise(per_metric[metric], DEFINITIONS[metric])
        summary = {"units": _units(metric, image_size if len(sizes) == 1 else None, evaluator.domain), **summary}
        if METRIC_ROLES[metric] == "keypoints":
            summary["skipped"] = dict(skipped_totals)
        report[metric] = summary
    report["compared"] = {
        "real": os.path.abspath(real_dir), "generated": os.path.abspath(generated_dir),
        "videos": len(pairs), "frames": total_frames, "image_size": image_size, "domain": evaluator.domain,
        "unmatched_real_videos": len(unmatched), "extractors": evaluator.describe(),
        "random_weights": evaluator.random_weights,
    }
    return report


def summary_line(report):
    """One line with the means of a report, e.g. ``akd 1.2345  aed 0.1234 over 10 videos, 320 frames``."""
    parts = [f"{metric} {format_mean(report[metric]['mean'])}" for metric in METRICS if metric in report]
    compared = report["compared"]
    line = f"{'  '.join(parts)} over {compared['videos']} videos, {compared['frames']} frames"
    if compared["random_weights"]:
        line += f"  (RANDOM WEIGHTS for {', '.join(compared['random_weights'])}: meaningless values)"
    return line


def evaluate_reconstruction(eval_params, real_dir, generated_dir, device, frame_shape=None, checkpoint=None,
                            progress=True):
    """The protocol metrics of a reconstruction's lossless strips (``generated_dir``) against the test
    split (``real_dir``), as configured in ``eval_params``; L1 is the reconstruction's own (float
    predictions) and is not recomputed. Returns the entries to add to its metrics.json (none when L1 is
    the only metric); ``checkpoint`` (the one evaluated) is recorded under "compared"."""
    metrics = [metric for metric in parse_metrics(eval_params["metrics"], "eval_params.metrics") if metric != "l1"]
    if not metrics:
        return {}
    domain = eval_params["domain"]
    check_metrics(metrics, domain, "eval_params.metrics")
    if real_dir is None:
        raise ValueError("eval_params.metrics: the protocol metrics need the real videos' folder (a FramesDataset)")
    weight_files = resolve_weights(domain, metrics, eval_params["weights"], eval_params["allow_random_weights"])
    report = evaluate_folders(real_dir, generated_dir, metrics, domain, weight_files, device,
                              eval_params["batch_size"], frame_shape, progress)
    report["compared"]["checkpoint"] = os.path.abspath(checkpoint) if checkpoint else None
    print(f"protocol metrics ({domain}): {summary_line(report)}")
    return report

