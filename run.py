"""Entry point: ``python run.py --config config/<name>.yaml [--mode train|train_avd|reconstruction]``.

Every run writes into a run directory ``<log_dir>/<config>-<tag>-<YYYYmmdd-HHMMSS>`` holding the
resolved config (config.yaml), TensorBoard logs, checkpoints and outputs. ``--mode train`` with
``--checkpoint`` resumes that run in the checkpoint's directory; ``train_avd`` and ``reconstruction``
read ``--checkpoint`` and write a new run directory (``train_avd`` resumes in place when the
checkpoint is one of its own). ``--checkpoint`` also takes TPSMM's published models (the upstream
layout, with their config) for ``reconstruction`` and ``train_avd``. ``--init_from`` (train, train_avd)
starts a new run from the weights of any such checkpoint: every tensor whose name and shape fit is
copied, the rest stays fresh, no optimiser state or epoch is taken; the run directory records it in
``init_from.json``.

Multi-GPU/multi-process: ``torchrun --nproc_per_node=N run.py ...`` (DDP; gloo on CPU, nccl on CUDA,
one GPU per process by LOCAL_RANK). Errors in the inputs (config, checkpoint, data, a frame size the
networks cannot take), a NaN/inf in training and a failed write (a full disk) end the run with one line
on stderr and exit status 1; a new run directory that holds nothing but its config.yaml (and
init_from.json) is then removed.
"""
import argparse
import datetime
import errno
import json
import os
import re
import shutil
import sys

import torch
import torch.distributed
import yaml

import checkpoint as checkpoints
from configuration import config_name, load_config
from evaluation import check_eval_config
from frames_dataset import dataset_from_config, read_frames
from modules import MAIN_NETWORKS, build_networks
from modules.sizes import check_frame_size
from reconstruction import evaluate_test_split
from synthetic import ensure_dataset
from train import Distributed, NonFiniteLossError, train, train_avd

MODES = ("train", "train_avd", "reconstruction")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="CPABMM: train, train the AVD network, or evaluate "
                                                 "reconstruction.")
    parser.add_argument("--config", required=True, help="YAML config, e.g. config/synthetic-64.yaml")
    parser.add_argument("--mode", default="train", choices=MODES)
    parser.add_argument("--log_dir", default="runs", help="parent folder of the run directories")
    parser.add_argument("--checkpoint", default=None,
                        help="train: resume this checkpoint; train_avd/reconstruction: the trained model "
                             "(this framework's, or TPSMM's with its config/tpsmm-*.yaml)")
    parser.add_argument("--init_from", default=None, metavar="CHECKPOINT",
                        help="train/train_avd: start a new run from this checkpoint's weights (this "
                             "framework's, TPSMM's or the official CPABMM's): tensors whose name and shape "
                             "fit are copied, the others stay fresh; no optimiser state, no epoch")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu); under torchrun "
                             "'cuda' means the GPU of LOCAL_RANK")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key, e.g. --set train_params.num_epochs=2 (repeatable; "
                             "the value is parsed as YAML)")
    parser.add_argument("--tag", default=None, help="run directory tag (default: the mode)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of data order and random draws (a resumed run keeps its own)")
    return parser.parse_args(argv)


def setup_distributed(device_arg):
    """(Distributed, torch.device): DDP from torchrun's environment variables, else one process."""
    default = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg or default)
    if "WORLD_SIZE" not in os.environ:
        return Distributed(), device
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, initialized=True), device


def run_dir_name(config_path, tag, now=None):
    """``<config>-<tag>-<YYYYmmdd-HHMMSS>``; the tag may hold letters, digits, '.', '_' and '-' only."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", tag):
        raise ValueError(f"--tag {tag!r}: use letters, digits, '.', '_' and '-' only")
    name = config_name(config_path)
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{name}-{tag}-{stamp}"


def _broadcast(value, dist):
    if not dist.initialized:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def frame_sizes(config, mode, probe):
    """[(frame size (H, W), where it comes from)] that the generator and the dense motion will get in
    ``mode``: the training frames (train: the crop size when the augmentation crops, else frame_shape)
    and the test frames (reconstruction, and train with evaluate_after_training); train_avd runs only
    the keypoint detector, which takes any size. Without frame_shape, ``probe`` reads frame 0 of the
    split's first video (once the data exist); else such sizes are left out."""
    data = config["dataset_params"]
    crop = (data["augmentation_params"]["crop_param"] or {}).get("size")
    splits = []
    if mode == "train":
        splits.append(True)
    if mode == "reconstruction" or (mode == "train" and config["train_params"]["evaluate_after_training"]):
        splits.append(False)
    sizes = []
    for is_train in splits:
        if is_train and crop:
            sizes.append((tuple(crop), "dataset_params.augmentation_params.crop_param.size"))
        elif data["frame_shape"]:
            sizes.append((tuple(data["frame_shape"][:2]), "dataset_params.frame_shape"))
        elif probe:
            dataset = dataset_from_config(data, is_train=is_train)
            path = os.path.join(dataset.split_dir, dataset.videos[0])
            sizes.append((read_frames(path, [0]).shape[1:3], f"the frames of {path} (dataset_params.frame_shape "
                                                             f"is null)"))
    return sizes


def check_frame_sizes(config, mode, probe):
    """Start-up check of :func:`frame_sizes` against the networks (``modules.sizes``): a one-line error
    naming the size, where it comes from, and the sizes that work."""
    for size, origin in frame_sizes(config, mode, probe):
        check_frame_size(config["model_params"], size, origin)


def prepare_run_dir(args, config, dist, resume_dir=None):
    """Create (rank 0) the run directory, write the resolved config; every rank gets its path.

    Resuming, the partial checkpoint files an interrupted write left there are deleted first."""
    run_dir = None
    if dist.is_main:
        if resume_dir is not None:
            run_dir = resume_dir
            removed = checkpoints.remove_partial_files(run_dir)
            if removed:
                megabytes = sum(size for _, size in removed) / 2 ** 20
                print(f"removed {len(removed)} partial checkpoint file(s) ({megabytes:.0f} MiB) that an "
                      f"interrupted write left in {run_dir}")
            config_path = checkpoints.resumed_config_path(run_dir, config)
        else:
            run_dir = os.path.join(args.log_dir, run_dir_name(args.config, args.tag or args.mode))
            os.makedirs(run_dir, exist_ok=False)
            config_path = os.path.join(run_dir, "config.yaml")
        with open(config_path, "w") as stream:
            yaml.safe_dump(config, stream, sort_keys=False)
    return _broadcast(run_dir, dist)


def execute(args, dist, device, created):
    """Run one mode; returns the metrics dict of a reconstruction, else None.

    ``created`` (a list) receives the run directory when this call creates a new one.
    """
    config = load_config(args.config, args.overrides)
    check_eval_config(config, args.mode == "reconstruction" or (
        args.mode == "train" and config["train_params"]["evaluate_after_training"]), args.config)
    check_frame_sizes(config, args.mode, probe=False)
    if args.init_from is not None and args.checkpoint is not None:
        raise ValueError("give --checkpoint (resume, or the model to evaluate) or --init_from (a new run from "
                         "its weights), not both")
    if args.init_from is not None and args.mode == "reconstruction":
        raise ValueError("--init_from starts a training run (--mode train or train_avd); --mode reconstruction "
                         "evaluates --checkpoint")
    if args.init_from is not None and not os.path.isfile(args.init_from):
        raise FileNotFoundError(f"--init_from: checkpoint file not found: {args.init_from}")
    checkpoint, resume_dir = None, None
    if args.checkpoint is not None:
        checkpoint, resume_dir = checkpoints.open_checkpoint(args.checkpoint, config, args.mode)
    elif args.mode != "train" and args.init_from is None:
        alternative = " or --init_from" if args.mode == "train_avd" else ""
        raise ValueError(f"--mode {args.mode} needs --checkpoint{alternative}")
    seed = int(checkpoint["seed"]) if checkpoint is not None and "seed" in checkpoint else args.seed

    # The one place the synthetic data set is generated (when root_dir is missing): rank 0, the others wait.
    if dist.is_main:
        ensure_dataset(config["dataset_params"])
    dist.barrier()
    check_frame_sizes(config, args.mode, probe=True)

    torch.manual_seed(seed)
    networks = build_networks(config, device)
    init_record = None
    if args.init_from is not None:
        names = MAIN_NETWORKS + (("avd_network",) if args.mode == "train_avd" else ())
        init_record = checkpoints.init_network_states(networks, args.init_from, names)
        if args.mode == "train_avd":
            # The initialised main networks are train_avd's frozen model; no optimizer_avd: a fresh AVD run.
            checkpoint = checkpoints.state_dicts(networks, MAIN_NETWORKS)
    run_dir = prepare_run_dir(args, config, dist, resume_dir)
    if resume_dir is None:
        created.append(run_dir)
    if dist.is_main:
        print(f"run directory: {run_dir}")
        if init_record is not None:
            record_path = os.path.join(run_dir, checkpoints.INIT_RECORD)
            with open(record_path, "w", encoding="utf-8") as stream:
                json.dump(init_record, stream, indent=2)
            print(f"{checkpoints.init_summary_line(init_record)}; fresh tensor names in {record_path}")

    if args.mode == "train":
        return train(config, networks, run_dir, device, dist=dist, seed=seed, checkpoint=checkpoint,
                     checkpoint_path=args.checkpoint)
    if args.mode == "train_avd":
        return train_avd(config, networks, run_dir, device, dist=dist, seed=seed, checkpoint=checkpoint,
                         checkpoint_path=args.checkpoint or args.init_from)
    checkpoints.load_network_states(networks, checkpoint, args.checkpoint, MAIN_NETWORKS, config_path=args.config)
    return evaluate_test_split(config, networks, run_dir, device, dist, checkpoint=args.checkpoint)


def one_line(error):
    """An OSError as one line: its message, with the file it concerns when it has one."""
    if isinstance(error, checkpoints.CheckpointWriteError) or not error.strerror:
        return str(error)
    reason = "no space left on device" if error.errno == errno.ENOSPC else error.strerror
    return f"{reason}: {error.filename}" if error.filename else reason


def main(argv=None):
    args = parse_args(argv)
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: CUDA is not available on this machine (use --device cpu)",
              file=sys.stderr)
        return 1
    dist, device = setup_distributed(args.device)
    created = []
    try:
        execute(args, dist, device, created)
    except (ValueError, OSError, NonFiniteLossError) as error:
        print(f"error: {one_line(error) if isinstance(error, OSError) else error}", file=sys.stderr)
        if dist.is_main and created and set(os.listdir(created[0])) <= {"config.yaml", checkpoints.INIT_RECORD}:
            shutil.rmtree(created[0])
        return 1
    finally:
        if dist.initialized:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
