"""Checkpoints: written atomically, read with ``weights_only=True``, checked against the config, loaded
into the networks; and where a run given ``--checkpoint`` continues.

A checkpoint is a plain dict: network state dicts under their network names (kp_detector,
dense_motion_network, inpainting_network, bg_predictor when there is one, avd_network when trained),
optimizer / scheduler state dicts (optimizer, scheduler, optimizer_bg, scheduler_bg; optimizer_avd,
scheduler_avd), integer counters (epoch, step; avd_epoch, avd_step), the seed and the resolved config
as a plain nested dict. Nothing in it needs unpickling of arbitrary classes.

Following ``run.py --checkpoint``: :func:`open_checkpoint` (read, config check, where the run goes), then
``train.train`` / ``train.train_avd`` / reconstruction call :func:`load_network_states` (and
:func:`load_training_states` to resume). :func:`network_states` is the one place that maps a loaded
dict to the networks' state dicts (the place for other checkpoint layouts).
"""
import datetime
import os
import pickle
import tempfile

import torch
import yaml

from modules import MAIN_NETWORKS

CHECKPOINT_NAME = "checkpoint.pth.tar"
NETWORK_NAMES = MAIN_NETWORKS + ("avd_network",)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (unreadable, wrong content, other config)."""


def save_checkpoint(path, state):
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then ``os.replace``.

    A crash while writing leaves the previous file intact; readers never see a half-written file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".pth.tar", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def save_epoch(run_dir, state, epochs_done, checkpoint_freq):
    """Latest checkpoint every epoch, a numbered copy every ``checkpoint_freq`` epochs (both atomic)."""
    save_checkpoint(os.path.join(run_dir, CHECKPOINT_NAME), state)
    if epochs_done % checkpoint_freq == 0:
        save_checkpoint(os.path.join(run_dir, f"checkpoint-{epochs_done:05d}.pth.tar"), state)


def state_dicts(networks, names):
    """{name: state dict} of the networks ``names`` that exist (bg_predictor is None without bg)."""
    return {name: networks[name].state_dict() for name in names if networks.get(name) is not None}


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict with ``torch.load(weights_only=True)``; one-line errors for bad files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict but a {type(state).__name__}")
    return state


def first_difference(expected, found, prefix=""):
    """Dotted key of the first difference between two nested dicts, with both values; None if equal."""
    if isinstance(expected, dict) and isinstance(found, dict):
        for key in sorted(set(expected) | set(found)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in expected or key not in found:
                return name, expected.get(key, "<missing>"), found.get(key, "<missing>")
            difference = first_difference(expected[key], found[key], name)
            if difference is not None:
                return difference
        return None
    if isinstance(expected, (list, tuple)) and isinstance(found, (list, tuple)):
        if list(expected) == list(found):
            return None
        return prefix, expected, found
    if expected != found:
        return prefix, expected, found
    return None


def check_config(checkpoint, config, path):
    """One-line error when the checkpoint was written for other ``model_params`` than ``config``'s."""
    if "config" not in checkpoint or not isinstance(checkpoint["config"], dict):
        raise CheckpointError(f"checkpoint {path} holds no config: not written by this framework")
    saved = checkpoint["config"].get("model_params")
    difference = first_difference(saved, config["model_params"], "model_params")
    if difference is not None:
        key, was, now = difference
        raise CheckpointError(f"checkpoint {path} belongs to another config: {key} is {was!r} there "
                              f"but {now!r} in this config")


def resume_dir(path, checkpoint, mode):
    """The run directory a run with ``--checkpoint path`` continues in, or None for a new one:
    ``train`` resumes in the checkpoint's folder, ``train_avd`` too when the checkpoint is one of its
    own (it holds optimizer_avd); ``train_avd`` from a main-network checkpoint and ``reconstruction``
    write a new run directory."""
    if mode == "train" or (mode == "train_avd" and "optimizer_avd" in checkpoint):
        return os.path.dirname(os.path.abspath(path))
    return None


def open_checkpoint(path, config, mode):
    """What ``run.py --checkpoint path --mode mode`` needs: (checkpoint dict, resume directory or None).

    Reads the file on the CPU, checks that it was written for ``config``'s model_params, and says where
    the run continues (:func:`resume_dir`).
    """
    checkpoint = load_checkpoint(path, map_location="cpu")
    check_config(checkpoint, config, path)
    return checkpoint, resume_dir(path, checkpoint, mode)


def resumed_config_path(run_dir, config):
    """Where a resumed run writes its resolved config: ``config.yaml``, or ``config-resumed-<time>.yaml``
    next to it when the run directory's ``config.yaml`` holds another config (e.g. more epochs)."""
    config_path = os.path.join(run_dir, "config.yaml")
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as stream:
            saved = yaml.safe_load(stream)
        if first_difference(saved, config) is not None:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            return os.path.join(run_dir, f"config-resumed-{stamp}.yaml")
    return config_path


def network_states(checkpoint):
    """{network name: state dict} of a loaded checkpoint (this framework's layout: one entry per network
    under its name)."""
    return {name: checkpoint[name] for name in NETWORK_NAMES if isinstance(checkpoint.get(name), dict)}


def _state_dict_problem(error):
    """The first problem of a ``load_state_dict`` error, shortened, with the number of further ones."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    problems = lines[1:] or lines[:1] or [type(error).__name__]
    first = problems[0] if len(problems[0]) <= 160 else problems[0][:157] + "..."
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return first + more


def load_network_states(networks, checkpoint, path, names, config_path=None):
    """Load the state dicts of ``names`` from ``checkpoint`` into ``networks`` (strict; a network that is
    None, e.g. bg_predictor without bg, is skipped). One-line errors naming the network (and
    ``config_path`` when given) for a missing entry or one that does not fit."""
    states = network_states(checkpoint)
    where = f" {config_path}" if config_path else ""
    for name in names:
        network = networks.get(name)
        if network is None:
            continue
        if name not in states:
            raise CheckpointError(f"checkpoint {path} has no '{name}' weights")
        try:
            network.load_state_dict(states[name])
        except (RuntimeError, TypeError, AttributeError) as error:
            raise CheckpointError(f"checkpoint {path} does not match config{where}: {name}: "
                                  f"{_state_dict_problem(error)}") from error


def load_training_states(checkpoint, path, targets):
    """Resume optimisers and schedulers: ``targets`` {checkpoint key: object with load_state_dict, or None
    (skipped)}; a missing key is a one-line error."""
    for key, target in targets.items():
        if target is None:
            continue
        if key not in checkpoint:
            raise CheckpointError(f"checkpoint {path} has no '{key}' state: cannot resume")
        target.load_state_dict(checkpoint[key])
