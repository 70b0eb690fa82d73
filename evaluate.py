"""Score generated videos against real ones with the papers' metrics (L1, AKD, MKR, AED).

    python evaluate.py --real data/vox/test --generated runs/<run>/reconstruction/png \\
        --metrics l1,akd,aed --domain face --out metrics.json

Videos are matched by name (extensions dropped: ``x.mp4``, ``x.mp4.png`` and the folder ``x`` are
one video); each is a folder of frames, an .mp4/.mov/.gif or a .png/.jpg strip of frames side by side
(square frames unless --frame_shape). Every generated video needs its real one, with as many frames
of the same size. ``--config`` takes the domain, metrics, weight files and batch size from a config's
``eval_params`` (flags override it). Weight files are the config's ``eval_params.weights``, or the
published names in ``--weights_dir`` (default ``weights/``), then the torch hub cache;
``--weight key=path`` names one. Nothing is downloaded.
Errors (a missing file, a mismatch) are one line on stderr and exit status 1.
"""
import argparse
import json
import logging
import os
import sys

from configuration import ConfigError

WEIGHT_KEYS = ("fan", "s3fd", "openface", "rtpose", "reid")


def _frame_shape(text):
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W, got {text!r}") from None
    if len(values) not in (2, 3) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H,W, got {text!r}")
    return values[:2]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Reconstruction metrics (pose-evaluation's definitions) of "
                                                 "generated videos against real ones.")
    parser.add_argument("--real", required=True, help="folder of the real (ground-truth) videos")
    parser.add_argument("--generated", required=True, help="folder of the generated videos")
    parser.add_argument("--metrics", default=None,
                        help="comma-separated subset of l1,akd,mkr,aed (default: the config's, else l1)")
    parser.add_argument("--domain", default=None, choices=("face", "body"),
                        help="face: FAN-4 landmarks + OpenFace (VoxCeleb); body: rtpose + re-ID (TaiChiHD, TED); "
                             "default: the config's, else face")
    parser.add_argument("--config", default=None, help="take eval_params (and frame_shape) from this config")
    parser.add_argument("--out", default="metrics.json", help="JSON report to write")
    parser.add_argument("--weights_dir", default=None,
                        help="folder holding the published weight files under their names (default: the "
                             "config's eval_params.weights, else weights/)")
    parser.add_argument("--weight", action="append", default=[], metavar="KEY=PATH",
                        help=f"one weight file ({', '.join(WEIGHT_KEYS)}); repeatable")
    parser.add_argument("--allow_random_weights", action="store_true",
                        help="random extractors for missing files (smoke tests only: meaningless values)")
    parser.add_argument("--frame_shape", type=_frame_shape, default=None, metavar="H,W",
                        help="frame size of .png/.jpg strips (default: square frames, or the config's)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--batch_size", type=int, default=None, help="frames per extractor pass (default 16)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def settings(args):
    """(metrics, domain, {key: path or None}, allow_random, batch size, frame shape) from flags and config."""
    from evaluation.weights import WEIGHT_SOURCES

    params, frame_shape = None, args.frame_shape
    if args.config is not None:
        from configuration import load_config

        config = load_config(args.config)
        params = config["eval_params"]
        frame_shape = frame_shape or config["dataset_params"]["frame_shape"]
    metrics = args.metrics if args.metrics is not None else (params["metrics"] if params else "l1")
    domain = args.domain or (params["domain"] if params else "face")
    weights = {key: os.path.join(args.weights_dir or "weights", WEIGHT_SOURCES[key][0]) for key in WEIGHT_KEYS}
    if params and args.weights_dir is None:
        weights.update({key: path for key, path in params["weights"].items() if path})
    for item in args.weight:
        key, _, path = item.partition("=")
        if key not in WEIGHT_KEYS or not path:
            raise ConfigError(f"--weight {item!r}: expected KEY=PATH with KEY one of {', '.join(WEIGHT_KEYS)}")
        weights[key] = path
    allow_random = args.allow_random_weights or bool(params and params["allow_random_weights"])
    batch_size = args.batch_size or (params["batch_size"] if params else 16)
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {batch_size}")
    return metrics, domain, weights, allow_random, batch_size, frame_shape


def run(args):
    import torch

    from evaluation import check_metrics, evaluate_folders, parse_metrics, resolve_weights, summary_line

    metrics, domain, weights, allow_random, batch_size, frame_shape = settings(args)
    metrics = parse_metrics(metrics, "--metrics")
    check_metrics(metrics, domain, "--metrics")
    weight_files = resolve_weights(domain, metrics, weights, allow_random, "--weight")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    report = evaluate_folders(args.real, args.generated, metrics, domain, weight_files, device, batch_size,
                              frame_shape, progress=not args.quiet)
    directory = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(directory, exist_ok=True)
    temporary = args.out + ".tmp"
    with open(temporary, "w") as stream:
        json.dump(report, stream, indent=2)
    os.replace(temporary, args.out)
    print(f"{summary_line(report)}; report in {args.out}")
    return report


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
