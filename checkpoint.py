"""Checkpoints: written atomically, read with ``weights_only=True``, checked against the config, loaded
into the networks; and where a run given ``--checkpoint`` continues.

A checkpoint is a plain dict: network state dicts under their network names (kp_detector,
dense_motion_network, inpainting_network, bg_predictor when there is one, avd_network when trained),
optimizer / scheduler state dicts (optimizer, scheduler, optimizer_bg, scheduler_bg; optimizer_avd,
scheduler_avd), integer counters (epoch, step; avd_epoch, avd_step), the seed and the resolved config
as a plain nested dict. Nothing in it needs unpickling of arbitrary classes.

The upstream layout (TPSMM's published models, and the official CPABMM code, whose loggers' ``save_cpk``
write ``{network name: state dict, ..., 'optimizer', 'optimizer_bg_predictor' or 'optimizer_avd': Adam
state dicts, 'epoch': int}``, bg_predictor absent without bg or before bg_start) uses the same network
names but holds no config: it is read for its weights only (:func:`checkpoint_layout`), which are then
checked against the config by strict loading; its optimiser entries and epoch are ignored. It too holds
only tensors, plain containers and numbers, so ``weights_only=True`` reads it.

Following ``run.py --checkpoint``: :func:`open_checkpoint` (read, config check, where the run goes), then
``train.train`` / ``train.train_avd`` / reconstruction call :func:`load_network_states` (and
:func:`load_training_states` to resume). :func:`network_states` is the one place that maps a loaded
dict to the networks' state dicts (the place for other checkpoint layouts). ``run.py --init_from``:
:func:`init_network_states` copies every tensor whose name and shape fit from a checkpoint of either
layout into fresh networks.
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
# The layouts :func:`checkpoint_layout` tells apart.
FRAMEWORK_LAYOUT = "framework"
UPSTREAM_LAYOUT = "upstream"   # TPSMM's / the official CPABMM's save_cpk
LAYOUT_NAMES = {FRAMEWORK_LAYOUT: "this framework's layout", UPSTREAM_LAYOUT: "TPSMM's / official CPABMM's layout"}
# The networks every upstream checkpoint holds (bg_predictor and avd_network are optional there).
UPSTREAM_REQUIRED = ("kp_detector", "dense_motion_network", "inpainting_network")
UPSTREAM_HINT = "TPSMM's published models need their config/tpsmm-*.yaml (motion: tps)"
INIT_RECORD = "init_from.json"


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


def checkpoint_layout(checkpoint, path):
    """``FRAMEWORK_LAYOUT`` (this framework's: it holds its config) or ``UPSTREAM_LAYOUT`` (TPSMM's / the
    official CPABMM's: no config, the state dicts of kp_detector, dense_motion_network and
    inpainting_network); a one-line error for anything else."""
    if isinstance(checkpoint.get("config"), dict):
        return FRAMEWORK_LAYOUT
    if all(isinstance(checkpoint.get(name), dict) for name in UPSTREAM_REQUIRED):
        return UPSTREAM_LAYOUT
    raise CheckpointError(f"checkpoint {path} holds no config and is not in TPSMM's layout either (state dicts "
                          f"under {', '.join(UPSTREAM_REQUIRED)}): not a checkpoint this framework reads")


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
    the run continues (:func:`resume_dir`). A checkpoint in the upstream layout (TPSMM's) has no config
    to check and nothing to resume: for ``reconstruction`` and ``train_avd`` (as the main networks) it
    becomes its network state dicts only (checked by strict loading, a new run directory); ``train``
    refuses it (``--init_from`` starts a run from its weights).
    """
    checkpoint = load_checkpoint(path, map_location="cpu")
    if checkpoint_layout(checkpoint, path) == UPSTREAM_LAYOUT:
        if mode == "train":
            raise CheckpointError(f"checkpoint {path} is in TPSMM's layout (no config, scheduler or step): it cannot "
                                  f"be resumed; start a new run from its weights with --init_from {path}")
        return network_states(checkpoint), None
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
    """{network name: state dict} of a loaded checkpoint. Both layouts keep one entry per network under
    the same names (kp_detector, dense_motion_network, inpainting_network, bg_predictor, avd_network);
    their other entries (optimisers, counters, config) are not networks."""
    return {name: checkpoint[name] for name in NETWORK_NAMES if isinstance(checkpoint.get(name), dict)}


def _shape(value):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def state_dict_differences(expected, found):
    """Why state dict ``found`` (a checkpoint's) does not load strict into a network whose own state
    dict is ``expected``: ["<key> has shape (..) in the checkpoint but (..) in this config", "<key> is
    missing from the checkpoint", "<key> of the checkpoint is not in this config's network"]; [] when
    it fits."""
    problems = []
    for key, value in expected.items():
        if key not in found:
            problems.append(f"{key} is missing from the checkpoint")
        elif not isinstance(found[key], torch.Tensor) or found[key].shape != value.shape:
            problems.append(f"{key} has shape {_shape(found[key])} in the checkpoint but {_shape(value)} in "
                            f"this config")
    problems.extend(f"{key} of the checkpoint is not in this config's network" for key in found if key not in expected)
    return problems


def _state_dict_problem(error):
    """The first problem of a ``load_state_dict`` error, shortened, with the number of further ones."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    problems = lines[1:] or lines[:1] or [type(error).__name__]
    first = problems[0] if len(problems[0]) <= 160 else problems[0][:157] + "..."
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return first + more


def load_network_states(networks, checkpoint, path, names, config_path=None):
    """Load the state dicts of ``names`` from ``checkpoint`` (either layout) into ``networks`` (strict; a
    network that is None, e.g. bg_predictor without bg, is skipped, but weights for it in the checkpoint
    are an error). One-line errors naming the network, the first key that does not fit with both shapes
    (and ``config_path`` when given) for a missing entry or one that does not fit."""
    states = network_states(checkpoint)
    where = f" {config_path}" if config_path else ""
    hint = f"; {UPSTREAM_HINT}" if not isinstance(checkpoint.get("config"), dict) else ""
    for name in names:
        network = networks.get(name)
        if network is None:
            if name in states:
                raise CheckpointError(f"checkpoint {path} does not match config{where}: it has '{name}' weights "
                                      f"but the config builds no {name} (model_params.common_params.bg is false)")
            continue
        if name not in states:
            raise CheckpointError(f"checkpoint {path} has no '{name}' weights")
        problems = state_dict_differences(network.state_dict(), states[name])
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CheckpointError(f"checkpoint {path} does not match config{where}: {name}.{problems[0]}{more}{hint}")
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


def copy_matching_states(networks, states, names):
    """Copy into ``networks`` (in place) every tensor of ``states`` ({network name: state dict}) whose
    network, key and shape match, for the networks ``names`` that exist (bg_predictor is None without
    bg); every other tensor keeps its value. Returns {name: {"copied": n, "fresh": [keys not copied],
    "unused": [keys of ``states[name]`` not copied]}}."""
    summary = {}
    for name in names:
        network = networks.get(name)
        if network is None:
            continue
        own = network.state_dict()
        source = states.get(name, {})
        matching = {key: value for key, value in source.items()
                    if key in own and isinstance(value, torch.Tensor) and value.shape == own[key].shape}
        network.load_state_dict(matching, strict=False)
        summary[name] = {"copied": len(matching), "fresh": [key for key in own if key not in matching],
                         "unused": [key for key in source if key not in matching]}
    return summary


def init_network_states(networks, path, names):
    """``run.py --init_from``: :func:`copy_matching_states` from the checkpoint at ``path`` (this
    framework's layout or the upstream one). Nothing else is read: no optimiser, scheduler, counter or
    config; the checkpoint may come from another config, e.g. TPSMM's into CPABMM, where the
    dense-motion layers whose shape depends on the number of warps stay fresh.

    Returns {"init_from": absolute path, "layout": ..., "networks": copy_matching_states' summary}.
    One-line errors for an unreadable file and for one of which no tensor fits.
    """
    checkpoint = load_checkpoint(path, map_location="cpu")
    layout = checkpoint_layout(checkpoint, path)
    summary = copy_matching_states(networks, network_states(checkpoint), names)
    if not any(entry["copied"] for entry in summary.values()):
        raise CheckpointError(f"--init_from {path}: no tensor of the checkpoint matches this config's networks "
                              f"({', '.join(summary)}) by name and shape")
    return {"init_from": os.path.abspath(path), "layout": layout, "networks": summary}


def init_summary_line(record):
    """The one line ``run.py --init_from`` prints: tensors copied / kept fresh per network."""
    counts = ", ".join(f"{name} {entry['copied']}/{len(entry['fresh'])}" for name, entry in record["networks"].items())
    layout = LAYOUT_NAMES[record["layout"]]
    return f"init_from {record['init_from']} ({layout}): tensors copied/fresh: {counts}"
