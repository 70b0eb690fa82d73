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
import errno
import os
import pickle
import re

import torch
import yaml

from modules import MAIN_NETWORKS

CHECKPOINT_NAME = "checkpoint.pth.tar"
NETWORK_NAMES = MAIN_NETWORKS + ("avd_network",)


# A checkpoint being written: ``<final name>.partial-<pid>`` (never matches ``*.pth.tar``).
PARTIAL_MARK = ".partial-"
_PARTIAL = re.compile(r"^(?P<name>.+)\.partial-(?P<pid>[0-9]+)$")
# What earlier versions wrote instead (``tempfile.mkstemp(prefix=".tmp-", suffix=".pth.tar")``).
_LEGACY_PARTIAL = re.compile(r"^\.tmp-[A-Za-z0-9_]{8}\.pth\.tar$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (unreadable, wrong content, other config)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, quota, I/O error); the previous file is intact.

    The message is one line naming the file.
    """


def _os_error_in(error):
    """The OSError behind ``error`` (itself, or the one it was raised while handling), or None.

    ``torch.save`` on a full disk raises a RuntimeError ("inline_container ... unexpected pos") while
    handling the writer's ``OSError: [Errno 28] No space left on device``.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def partial_path(path, pid=None):
    """Where ``path`` is written before it is renamed into place: ``<path>.partial-<pid>``."""
    return f"{path}{PARTIAL_MARK}{os.getpid() if pid is None else pid}"


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_partial_files(folder):
    """Delete the ``*.partial-<pid>`` files an interrupted write (kill -9, power loss) left in ``folder``,
    except those of a process still running, and the ``.tmp-*.pth.tar`` ones of earlier versions;
    returns [(path, size in bytes)] of the deleted ones."""
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        match = _PARTIAL.match(name)
        if (match is None and not _LEGACY_PARTIAL.match(name)) or not os.path.isfile(path):
            continue
        if match is not None and int(match.group("pid")) != os.getpid() and _process_alive(int(match.group("pid"))):
            continue
        size = os.path.getsize(path)
        os.remove(path)
        removed.append((path, size))
    return removed


def save_checkpoint(path, state):
    """Write ``state`` to ``path`` atomically: ``<path>.partial-<pid>`` in the same folder, then ``os.replace``.

    A crash while writing leaves the previous file intact (readers never see a half-written file) and
    at most the partial file, which :func:`remove_partial_files` deletes on the next start. The file gets
    the usual mode (0666 less the umask, like any other output). A full disk or another OS error is a
    ``CheckpointWriteError`` naming the file (the partial file is removed, the previous one kept).
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp_path = partial_path(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp_path, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        os_error = _os_error_in(error) if isinstance(error, (OSError, RuntimeError)) else None
        if os_error is None:
            raise
        reason = "no space left on device" if os_error.errno == errno.ENOSPC else (
            os_error.strerror or str(os_error)).lower()
        kept = " (the previous checkpoint is kept)" if os.path.exists(path) else ""
        failure = CheckpointWriteError(f"cannot write checkpoint {path}: {reason}{kept}")
        failure.errno = os_error.errno
        raise failure from None


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
