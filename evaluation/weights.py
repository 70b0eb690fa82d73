"""The published weight files of the protocol extractors: names, sources, look-up, loading.

Nothing is ever downloaded. A file is looked for, in order, at
1. the path given for ``eval_params.weights.<key>`` (config) or ``--weight <key>=PATH`` (evaluate.py),
   relative paths being relative to the current working directory, then
2. the torch hub cache: ``torch.hub.get_dir()/checkpoints/<canonical file name>`` (where
   face-alignment >= 1.1 keeps ``2DFAN4-11f355bf06.pth.tar`` and ``s3fd-619a316812.pth``).
A missing file is a :class:`MissingWeightsError` (one line: the key, the file, where to get it) unless
random weights are allowed (smoke tests only: the metrics are then meaningless, and say so).
"""
import hashlib
import logging
import os

import torch

from configuration import ConfigError
from losses.pretrained import MissingWeightsError, find_weight_file

LOGGER = logging.getLogger(__name__)

# key -> (canonical file name, where to get it, what pose-evaluation's pinned code loads)
WEIGHT_SOURCES = {
    "fan": ("2DFAN4-11f355bf06.pth.tar",
            "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar",
            "face-alignment's 2-D FAN-4 (68 landmarks); face-alignment 1.0.0, pinned by pose-evaluation, "
            "fetched it as 2DFAN-4.pth.tar from the same folder"),
    "s3fd": ("s3fd-619a316812.pth",
             "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth",
             "face-alignment's S3FD face detector (face-alignment 1.0.0 named it s3fd_convert.pth)"),
    "openface": ("openface.pth",
                 "https://github.com/thnkim/OpenFacePytorch (openface.pth at commit d002218)",
                 "OpenFace nn4.small2.v1 converted to PyTorch by thnkim/OpenFacePytorch"),
    "rtpose": ("pose_model.pth",
               "https://yadi.sk/d/0L-PgAaGRKgkJA (the link in pose-evaluation's README)",
               "the rtpose VGG19 body-pose model of pytorch_Realtime_Multi-Person_Pose_Estimation"),
    "reid": ("reid_model.pth",
             "https://yadi.sk/d/jAPhvFEFp6qzIw (the link in pose-evaluation's README)",
             "the person re-ID ft_net (ResNet-50, 751 Market-1501 ids) of layumi/Person_reID_baseline_pytorch"),
}


def candidate_paths(key, path):
    """Where :func:`resolve_weight_file` looks for ``key``, in order."""
    name = WEIGHT_SOURCES[key][0]
    candidates = [path] if path else []
    candidates.append(os.path.join(torch.hub.get_dir(), "checkpoints", name))
    return candidates


def resolve_weight_file(key, path, allow_random_weights, option="eval_params.weights"):
    """The existing file for ``key``, or None when it is missing and random weights are allowed.

    ``option`` names the setting in messages: a config section (``eval_params.weights`` ->
    ``eval_params.weights.fan``) or a flag (``--weight`` -> ``--weight fan=...``).
    """
    if key not in WEIGHT_SOURCES:
        raise ConfigError(f"{option}: unknown weight key '{key}' (known: {', '.join(WEIGHT_SOURCES)})")
    setting = f"{option} {key}=..." if option.startswith("--") else f"{option}.{key}"
    name, url, _ = WEIGHT_SOURCES[key]
    return find_weight_file(setting, candidate_paths(key, path), path or name, name, url,
                            allow_random_weights,
                            f"the {key} network is randomly initialised (allow_random_weights: smoke tests only, "
                            "its metrics are meaningless)", "set allow_random_weights for a smoke test")


def describe_weight_file(path):
    """{'path', 'bytes', 'sha256'} of a weight file, or {'path': None, 'random': True}."""
    if path is None:
        return {"path": None, "random": True}
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def load_state_dict(path, key):
    """A state dict from ``path`` on the CPU: a plain ``torch.save`` dict (``weights_only``), a checkpoint
    dict holding it under ``state_dict``, or (``.zip``) a TorchScript archive's parameters and buffers.
    A ``module.`` prefix (``DataParallel``) is removed."""
    try:
        if path.endswith(".zip"):
            state = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MissingWeightsError(f"{key}: cannot read weight file {path} ({first})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise MissingWeightsError(f"{key}: {path} holds a {type(state).__name__}, not a state dict")
    if state and all(name.startswith("module.") for name in state):
        state = {name[len("module."):]: value for name, value in state.items()}
    return state


def load_published(module, path, key):
    """Load ``path`` into ``module`` strictly; a layout mismatch is a one-line error naming the file."""
    state = load_state_dict(path, key)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        expected = set(module.state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        detail = (f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                  f"(e.g. {unexpected[:3]})") if missing or unexpected else str(error).splitlines()[-1].strip()
        raise MissingWeightsError(f"{key}: {path} does not have the published layout: {detail}") from None
    return module
