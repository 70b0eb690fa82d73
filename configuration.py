"""Strict YAML configuration: the schema (the one table of defaults), loader, command-line overrides.

Every config in ``config/`` is validated against ``SCHEMA`` below. An unknown or misspelt key, a
missing required key, a value of the wrong type or out of its range raises ``ConfigError`` with one
line that names the dotted key and the file (and the closest valid key for a misspelling).
``load_config`` returns a plain nested dict in which every key of the schema is present: keys a file
leaves out get the default written here (the official vox-256 value unless the help text says
otherwise). The constructors the config feeds take explicit arguments without defaults, so no other
default table exists. Each key's help text starts the comment of that key in every YAML file of
``config/`` (checked by ``comment_mismatches``, run by the tests); a file may add its own note after it.

Type specs are strings: ``int``, ``float`` (an int is accepted and converted; NaN and infinities are
refused), ``bool``, ``str``, ``null``, ``list[int]``, ``list[float]``, joined by ``|`` for alternatives
(``str|null``). ``interval`` ("[1, inf)", "(0, 1]") bounds a number, or every item of a list of numbers.

Command line: ``python configuration.py --describe`` prints every key with its type, default, range and
help; ``python configuration.py --check config/*.yaml`` validates files and their comments.
"""

import argparse
import copy
import difflib
import math
import os
import re
import sys
from dataclasses import dataclass

import yaml

REQUIRED = object()


class ConfigError(ValueError):
    """A config file or override is invalid; the message is one line naming the key and the file."""


def parse_interval(text):
    """``"[1, inf)"`` -> (1.0, inf, True, False): (low, high, low included, high included)."""
    if not text:
        return None
    match = re.fullmatch(r"([\[(])\s*(-?[0-9.e+-]+|-inf)\s*,\s*(-?[0-9.e+-]+|inf)\s*([\])])", text)
    if match is None:
        raise ValueError(f"bad interval {text!r} in the config schema")
    opening, low, high, closing = match.groups()
    return float(low), float(high), opening == "[", closing == "]"


def in_interval(value, interval):
    low, high, low_closed, high_closed = parse_interval(interval)
    above = value >= low if low_closed else value > low
    below = value <= high if high_closed else value < high
    return above and below


@dataclass(frozen=True)
class Key:
    """One leaf key: type spec, default (``REQUIRED`` = must be given), help text, constraints
    (``choices``, list ``length``, numeric ``interval`` such as "[1, inf)")."""

    types: str
    default: object = REQUIRED
    help: str = ""
    choices: tuple = ()
    length: tuple = ()
    interval: str = ""

    def __post_init__(self):
        parse_interval(self.interval)


@dataclass(frozen=True)
class Section:
    """A mapping of keys. ``nullable``: the section may be ``null`` (its default is then ``None``)."""

    keys: dict
    help: str = ""
    nullable: bool = False
    required: bool = False


_DTYPES = ("float32", "bfloat16")
# Intervals of numeric keys (applied to every item of a list).
_POSITIVE = "(0, inf)"
_NON_NEGATIVE = "[0, inf)"
_COUNT = "[1, inf)"
_INDEX = "[0, inf)"
_PROBABILITY = "[0, 1]"

# The motion models' settings (modules/motion.py): one section each under dense_motion_params, named as
# the ``motion`` value that selects it; its keys are the model class's constructor arguments.
MOTION_SECTIONS = {
    "cpab": Section(help="CPAB motion (motion: cpab): K partial warps and a global one, fitted to the keypoints",
                    keys={
        "global_cpab": Key("bool", True, "add the global warp fitted to all 5K keypoint pairs"),
        "partial_tess_size": Key("list[int]", [4, 4], "tessellation of the K partial warps", length=(2,),
                                 interval=_COUNT),
        "global_tess_size": Key("list[int]", [6, 6], "tessellation of the global warp", length=(2,),
                                interval=_COUNT),
        "zero_boundary": Key("bool", False, "velocity 0 on the border (false: libcpab's continuous "
                                            "\"valid outside\" fields)"),
        "volume_preservation": Key("bool", False, "trace-0 cells"),
        "basis": Key("str", "libcpab", "null-space basis: libcpab (official: libcpab's own, so theta and the Adam "
                                       "fit are the official code's) | vertex (this framework's earlier one, theta "
                                       "rotated)", choices=("libcpab", "vertex")),
        "backend": Key("str", "auto", "CPAB integrator: auto (Triton kernels on CUDA, the PyTorch reference on CPU) "
                                      "| reference | triton (on CPU: Triton's interpreter, TRITON_INTERPRET=1)",
                       choices=("auto", "reference", "triton")),
        "fit_method": Key("str", "adam", "adam (official) | gauss_newton (fast, this framework)",
                          choices=("adam", "gauss_newton")),
        "max_iter": Key("int", 100, "Adam steps of the partial fits", interval=_NON_NEGATIVE),
        "global_iter_multiplier": Key("float", 1.5, "the global fit runs max_iter * this many steps",
                                      interval=_NON_NEGATIVE),
        "fit_lr": Key("float", 0.01, "Adam learning rate of the fit", interval=_POSITIVE),
        "theta_init": Key("float", 1.0e-6, "constant initial theta of the Adam fit"),
        "gn_iter": Key("int", 10, "gauss_newton iterations", interval=_NON_NEGATIVE),
        "gn_damping": Key("float", 1.0e-3, "gauss_newton Tikhonov weight on theta", interval=_NON_NEGATIVE),
        "detach_keypoints": Key("bool", True, "no gradient from the warps into the keypoints (official)"),
    }),
    "tps": Section(help="TPS motion (motion: tps): TPSMM's thin-plate splines, no settings", keys={}),
}

SCHEMA = Section(required=True, keys={
    "dataset_params": Section(required=True, help="what the videos are and how training pairs are drawn", keys={
        "root_dir": Key("str", help="FOMM layout: <root_dir>/train/<video>, <root_dir>/test/<video>"),
        "frame_shape": Key("list[int]|null", None, "[H, W, C] of one frame (needed for .png/.jpg strips; frames of "
                                                   "another size are an error)",
                           length=(2, 3), interval=_COUNT),
        "id_sampling": Key("bool", False, "draw a person id first, then one of its videos (names id#video#clip)"),
        "pairs_list": Key("str|null", None, "CSV of (source, driving) animation pairs (FOMM's key; no mode "
                                            "of this framework reads it)"),
        "synthetic": Section(nullable=True, help="parameters of the embedded generator (synthetic.py)", keys={
            "seed": Key("int", 0, "same seed -> identical frames", interval=_INDEX),
            "num_train": Key("int", 256, "videos in <root_dir>/train", interval=_COUNT),
            "num_test": Key("int", 32, "videos in <root_dir>/test", interval=_COUNT),
            "num_frames": Key("int", 32, "frames per video", interval="[2, inf)"),
            "size": Key("int", 64, "frame height = width in pixels", interval="[16, inf)"),
            "format": Key("str", "mp4",
                          "mp4 (lossy, small on disk) | frames (lossless png folders, fast random access)",
                          choices=("mp4", "frames")),
        }),
        "augmentation_params": Section(help="training augmentation, identical for source and driving "
                                            "(augmentation.py)", keys={
            "flip_param": Section(nullable=True, help="random flips", keys={
                "horizontal_flip": Key("bool", False, "flip source and driving together with p = 0.5"),
                "time_flip": Key("bool", False, "swap the order of the two frames with p = 0.5"),
            }),
            "resize_param": Section(nullable=True, help="random rescale (MGif)", keys={
                "ratio": Key("list[float]", help="[min, max] of the factor both frames are rescaled by "
                                                 "(nearest neighbour)", length=(2,), interval=_POSITIVE),
            }),
            "crop_param": Section(nullable=True, help="random crop, edge-padded when the frame is smaller (MGif)",
                                  keys={
                "size": Key("list[int]", help="[H, W] of the crop", length=(2,), interval=_COUNT),
            }),
            "jitter_param": Section(nullable=True, help="colour jitter applied identically to both frames", keys={
                "brightness": Key("float", 0.0, "brightness factor drawn in [max(0, 1 - b), 1 + b]; 0 = off",
                                  interval=_NON_NEGATIVE),
                "contrast": Key("float", 0.0, "contrast factor drawn in [max(0, 1 - c), 1 + c]; 0 = off",
                                interval=_NON_NEGATIVE),
                "saturation": Key("float", 0.0, "saturation factor drawn in [max(0, 1 - s), 1 + s]; 0 = off",
                                  interval=_NON_NEGATIVE),
                "hue": Key("float", 0.0, "hue shift drawn in [-h, h]; 0 = off", interval="[0, 0.5]"),
            }),
        }),
    }),
    "model_params": Section(required=True, help="network shapes (modules/)", keys={
        "common_params": Section(required=True, help="shared by every network", keys={
            "num_cpab": Key("int", help="K: groups of 5 keypoints, one partial CPAB warp each (official key: "
                                        "num_tps)", interval=_COUNT),
            "num_channels": Key("int", 3, "image channels", interval=_COUNT),
            "bg": Key("bool", True, "background affine predictor on"),
            "multi_mask": Key("bool", True, "4 occlusion masks at 1/8, 1/4, 1/2, 1 of the input resolution"),
        }),
        "generator_params": Section(help="inpainting network (encoder/decoder)", keys={
            "block_expansion": Key("int", 64, "channels of the first encoder level", interval=_COUNT),
            "max_features": Key("int", 512, "channel cap of the encoder/decoder", interval=_COUNT),
            "num_down_blocks": Key("int", 3, "encoder levels", interval=_COUNT),
        }),
        "dense_motion_params": Section(help="dense motion network and its motion model", keys={
            "block_expansion": Key("int", 64, "hourglass width", interval=_COUNT),
            "max_features": Key("int", 1024, "hourglass channel cap", interval=_COUNT),
            "num_blocks": Key("int", 5, "hourglass depth", interval=_COUNT),
            "scale_factor": Key("float", 0.25, "resolution of the dense motion relative to the input",
                                interval="(0, 1]"),
            "kp_variance": Key("float", 0.01, "variance of the Gaussian keypoint heatmaps", interval=_POSITIVE),
            "motion": Key("str", "cpab", "the motion model: cpab | tps (TPSMM's thin-plate splines); its "
                                         "settings are the section of that name",
                          choices=tuple(MOTION_SECTIONS)),
            **MOTION_SECTIONS,
        }),
        "avd_network_params": Section(help="animation-via-disentanglement network", keys={
            "id_bottle_size": Key("int", 128, "identity code size", interval=_COUNT),
            "pose_bottle_size": Key("int", 128, "pose code size", interval=_COUNT),
        }),
    }),
    "train_params": Section(required=True, help="main training (run.py --mode train)", keys={
        "num_epochs": Key("int", help="training epochs", interval=_COUNT),
        "num_repeats": Key("int", help="DatasetRepeater: passes over the training videos per epoch", interval=_COUNT),
        "epoch_milestones": Key("list[int]", [70, 90], "MultiStepLR, x0.1 at each", interval=_COUNT),
        "lr_generator": Key("float", help="Adam lr of kp detector + dense motion + generator (and BG predictor)",
                            interval=_POSITIVE),
        "batch_size": Key("int", help="pairs per iteration (all processes together)", interval=_COUNT),
        "scales": Key("list[float]", [1.0, 0.5, 0.25, 0.125], "perceptual pyramid", interval="(0, 1]"),
        "dataloader_workers": Key("int", 12, "DataLoader worker processes", interval=_NON_NEGATIVE),
        "checkpoint_freq": Key("int", 50, "numbered checkpoint copy every N epochs (latest is written every epoch)",
                               interval=_COUNT),
        "log_freq": Key("int", 100, "TensorBoard scalars every N iterations", interval=_COUNT),
        "image_freq": Key("int", 1000, "TensorBoard image grids every N iterations", interval=_COUNT),
        "max_steps_per_epoch": Key("int|null", None, "cap on iterations per epoch; null = the whole (repeated) "
                                                     "data set", interval=_COUNT),
        "evaluate_after_training": Key("bool", False, "reconstruct the test split after training; prints L1 and "
                                                      "the baseline L1"),
        "eval_batch_size": Key("int", 32, "frames per forward pass when reconstructing a test video",
                               interval=_COUNT),
        "dropout_epoch": Key("int", 35, "dropout softmax while epoch < this", interval=_NON_NEGATIVE),
        "dropout_maxp": Key("float", 0.3, "final dropout probability of the contribution maps",
                            interval=_PROBABILITY),
        "dropout_startp": Key("float", 0.1, "dropout probability at epoch 0", interval=_PROBABILITY),
        "dropout_inc_epoch": Key("int", 10, "epochs to ramp linearly from dropout_startp to dropout_maxp",
                                 interval=_COUNT),
        "bg_start": Key("int", 10, "epoch from which the BG predictor is used and trained", interval=_NON_NEGATIVE),
        "clip_grad_norm": Key("float|null", 10.0, "max-norm (norm type inf) on kp detector, dense motion, BG "
                                                  "predictor; null = off", interval=_POSITIVE),
        "amp": Key("bool", False, "bf16 autocast (off = faithful fp32)"),
        "channels_last": Key("bool", False, "channels_last memory format"),
        "transform_params": Section(help="random TPS of the equivariance loss", keys={
            "sigma_affine": Key("float", 0.05, "std of the affine part", interval=_NON_NEGATIVE),
            "sigma_tps": Key("float", 0.005, "std of the control-point displacements", interval=_NON_NEGATIVE),
            "points_tps": Key("int", 5, "control points per side", interval="[2, inf)"),
        }),
        "loss_weights": Section(help="a weight of 0 switches a loss off (and skips building it)", keys={
            "perceptual": Key("list[float]", [10.0] * 5, "one weight per VGG-19 layer", length=(5,),
                              interval=_NON_NEGATIVE),
            "equivariance_value": Key("float", 10.0, "keypoint equivariance under a random TPS",
                                      interval=_NON_NEGATIVE),
            "warp_loss": Key("float", 10.0, "encoder features of the driving frame vs warped source features",
                             interval=_NON_NEGATIVE),
            "bg": Key("float", 10.0, "background cycle consistency, from bg_start", interval=_NON_NEGATIVE),
            "sam": Key("float", 1.0, "SAM-guided keypoint semantic loss (reconstruction: not in the official code)",
                       interval=_NON_NEGATIVE),
            "structure": Key("float", 0.1, "DINO structure alignment (hard-coded 0.1 upstream)",
                             interval=_NON_NEGATIVE),
        }),
        "pretrained": Section(help="local weight files (nothing is ever downloaded)", keys={
            "vgg19": Key("str|null", "weights/vgg19-dcbb9e9d.pth", "torchvision ImageNet VGG-19"),
            "dino_vitb8": Key("str|null", "weights/dino_vitbase8_pretrain.pth", "DINO ViT-B/8 backbone"),
            "sam_checkpoint": Key("str|null", "weights/sam_vit_b_01ec64.pth", "segment-anything checkpoint"),
            "sam_model_type": Key("str", "vit_b", "vit_b | vit_l | vit_h, must match sam_checkpoint",
                                  choices=("vit_b", "vit_l", "vit_h")),
            "allow_random_weights": Key("bool", False, "true: missing weight files are replaced by random ones "
                                                       "(smoke tests only)"),
        }),
        "sam_params": Section(help="SAM keypoint semantic loss", keys={
            "input_size": Key("int", 1024, "long side fed to the SAM encoder (SAM's own: 1024; a multiple of 16)",
                              interval="[16, 1024]"),
            "dtype": Key("str", "float32", "float32 | bfloat16 for the frozen SAM encoder", choices=_DTYPES),
            "every_n_steps": Key("int", 1, "compute the SAM loss every N iterations", interval=_COUNT),
        }),
        "structure_params": Section(help="DINO structure alignment loss", keys={
            "dtype": Key("str", "float32", "float32 | bfloat16 for the frozen DINO model", choices=_DTYPES),
        }),
    }),
    "train_avd_params": Section(help="animation-via-disentanglement training (run.py --mode train_avd)", keys={
        "num_epochs": Key("int", 200, "epochs", interval=_COUNT),
        "num_repeats": Key("int", 300, "passes over the training videos per epoch", interval=_COUNT),
        "batch_size": Key("int", 256, "batch size (all processes together)", interval=_COUNT),
        "dataloader_workers": Key("int", 24, "DataLoader worker processes", interval=_NON_NEGATIVE),
        "checkpoint_freq": Key("int", 50, "numbered checkpoint copy every N epochs", interval=_COUNT),
        "epoch_milestones": Key("list[int]", [140, 180], "MultiStepLR, x0.1 at each", interval=_COUNT),
        "lr": Key("float", 1.0e-3, "Adam learning rate of the AVD network", interval=_POSITIVE),
        "lambda_shift": Key("float", 1.0, "weight of the keypoint reconstruction loss", interval=_NON_NEGATIVE),
        "lambda_affine": Key("float|null", None, "in the official MGif config only; the AVD loss does not read it",
                             interval=_NON_NEGATIVE),
        "random_scale": Key("float", 0.25, "scale of the random transform of the pose keypoints",
                            interval=_PROBABILITY),
    }),
    "eval_params": Section(help="metrics of run.py --mode reconstruction, as pose-evaluation computes them", keys={
        "metrics": Key("list[str]", ["l1"],
                       "subset of l1, akd, mkr, aed (akd, mkr, aed need the extractors of domain)"),
        "domain": Key("str", "face", "face | body: which extractors",
                      choices=("face", "body")),
        "batch_size": Key("int", 16, "frames per extractor forward pass", interval=_COUNT),
        "weights": Section(help="published weight files of the extractors", keys={
            "fan": Key("str|null", "weights/2DFAN4-11f355bf06.pth.tar", "face-alignment 2-D FAN-4"),
            "s3fd": Key("str|null", "weights/s3fd-619a316812.pth", "face-alignment's S3FD face detector"),
            "openface": Key("str|null", "weights/openface.pth", "OpenFace nn4.small2.v1"),
            "rtpose": Key("str|null", "weights/pose_model.pth", "rtpose VGG19 body pose"),
            "reid": Key("str|null", "weights/reid_model.pth", "person re-ID ft_net ResNet-50"),
        }),
        "allow_random_weights": Key("bool", False,
                                    "true: missing weight files give random extractors (smoke tests only)"),
    }),
    "visualizer_params": Section(help="image grids (logger.py)", keys={
        "kp_size": Key("int", 5, "keypoint disc radius in pixels", interval=_NON_NEGATIVE),
        "draw_border": Key("bool", True, "thin border around each image of the grid"),
        "colormap": Key("str", "gist_rainbow", "matplotlib colormap of the keypoint colours"),
    }),
})


def config_name(path):
    """The file stem of a config path (``config/vox-256.yaml`` -> ``vox-256``), e.g. for run dirs."""
    return os.path.splitext(os.path.basename(str(path)))[0]


def _type_ok(spec, value):
    """Return ``(ok, converted_value)`` for one atomic type spec."""
    if spec == "null":
        return value is None, value
    if spec == "bool":
        return isinstance(value, bool), value
    if spec == "int":
        return isinstance(value, int) and not isinstance(value, bool), value
    if spec == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            # PyYAML reads 1e-4 (no dot) as a string; accept what float() reads.
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if spec == "str":
        return isinstance(value, str), value
    if spec.startswith("list[") and spec.endswith("]"):
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for item in value:
            ok, item = _type_ok(spec[5:-1], item)
            if not ok:
                return False, value
            out.append(item)
        return True, out
    raise ValueError(f"bad type spec {spec!r} in the config schema")


def _describe(value):
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"


class _Validator:
    def __init__(self, path, overridden):
        self.path = path
        self.overridden = overridden

    def where(self, dotted):
        for key in self.overridden:
            if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
                return f"{self.path} (--set {key})"
        return self.path

    def fail(self, dotted, message):
        raise ConfigError(f"{self.where(dotted)}: {message}")

    def suggest(self, section, prefix, name):
        close = difflib.get_close_matches(name, list(section.keys), n=1, cutoff=0.6)
        if close:
            return f" (did you mean '{prefix}{close[0]}'?)"
        elsewhere = [d for d in _all_dotted(SCHEMA) if d.rsplit(".", 1)[-1] == name]
        if elsewhere:
            return f" (it belongs under '{elsewhere[0]}')"
        return f" (valid keys here: {', '.join(section.keys)})"

    def section(self, section, data, dotted):
        prefix = dotted + "." if dotted else ""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            self.fail(dotted, f"'{dotted or '<top level>'}' must be a mapping, got {_describe(data)}")
        for name in data:
            if name not in section.keys:
                self.fail(prefix + str(name),
                          f"unknown key '{prefix}{name}'{self.suggest(section, prefix, str(name))}")
        out = {}
        for name, spec in section.keys.items():
            key = prefix + name
            if isinstance(spec, Section):
                if name not in data:
                    if spec.required:
                        self.fail(key, f"missing required section '{key}'")
                    out[name] = None if spec.nullable else self.section(spec, {}, key)
                elif data[name] is None and spec.nullable:
                    out[name] = None
                else:
                    out[name] = self.section(spec, data[name], key)
            elif name in data:
                out[name] = self.leaf(spec, data[name], key)
            elif spec.default is REQUIRED:
                self.fail(key, f"missing required key '{key}' ({spec.help})")
            else:
                out[name] = copy.deepcopy(spec.default)
        return out

    def leaf(self, spec, value, key):
        for alternative in spec.types.split("|"):
            ok, converted = _type_ok(alternative, value)
            if ok:
                break
        else:
            self.fail(key, f"'{key}' must be {spec.types}, got {_describe(value)}")
        if spec.choices and converted not in spec.choices:
            self.fail(key, f"'{key}' must be one of {', '.join(spec.choices)}, got {converted!r}")
        if spec.length and isinstance(converted, list) and len(converted) not in spec.length:
            lengths = " or ".join(str(n) for n in spec.length)
            self.fail(key, f"'{key}' must have {lengths} items, got {len(converted)}")
        numbers = converted if isinstance(converted, list) else [converted]
        for number in numbers:
            if isinstance(number, float) and not math.isfinite(number):
                self.fail(key, f"'{key}' must be a finite number, got {number}")
            if spec.interval and isinstance(number, (int, float)) and not isinstance(number, bool) \
                    and not in_interval(number, spec.interval):
                item = " (every item)" if isinstance(converted, list) else ""
                self.fail(key, f"'{key}'{item} must be in {spec.interval}, got {number!r}")
        return converted


def _all_dotted(section, prefix=""):
    for name, spec in section.keys.items():
        if isinstance(spec, Section):
            yield prefix + name
            yield from _all_dotted(spec, prefix + name + ".")
        else:
            yield prefix + name


def parse_override(text):
    """Split ``"dotted.key=value"`` into ``(key, value)``; the value is parsed as YAML."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"bad override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not part or part != part.strip() or " " in part for part in parts):
        raise ConfigError(f"bad override {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        problem = str(error).splitlines()[0]
        raise ConfigError(f"bad override {text!r}: the value is not valid YAML ({problem})") from None
    return key, value


def apply_overrides(data, overrides, path="<config>"):
    """Set each ``dotted.key=value`` in the raw nested dict ``data`` (in place); returns the keys."""
    keys = []
    for text in overrides:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                if part in node and node[part] is not None:
                    parent = ".".join(parts[:depth + 1])
                    raise ConfigError(f"{path} (--set {key}): '{parent}' is a value, not a section")
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        keys.append(key)
    return keys


def validate(data, path="<config>", overridden=()):
    """Validate a raw nested dict against ``SCHEMA``; returns a copy with every default filled."""
    return _Validator(str(path), tuple(overridden)).section(SCHEMA, data, "")


def load_config(path, overrides=()):
    """Read, override and validate a YAML config.

    Args:
        path: the YAML file.
        overrides: iterable of ``"dotted.key=value"`` strings (values parsed with ``yaml.safe_load``),
            applied in order before validation, so they are checked like the file's own keys.
    Returns:
        A plain nested dict with every schema key present.
    Raises:
        ConfigError: one line naming the file and the offending key.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle)
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not a YAML text file (byte {error.start} is not UTF-8: a binary "
                              f"file?)") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML{line}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {_describe(data)}")
    overridden = apply_overrides(data, overrides, path)
    return validate(data, path, overridden)


def describe_schema():
    """Lines ``dotted.key  type  default  [range]  help`` of the whole schema (``--describe``)."""
    lines = []

    def walk(section, prefix):
        for name, spec in section.keys.items():
            if isinstance(spec, Section):
                lines.append(f"{prefix}{name}  section{' or null' if spec.nullable else ''}  {spec.help}")
                walk(spec, prefix + name + ".")
            else:
                default = "required" if spec.default is REQUIRED else repr(spec.default)
                bounds = f"  in {spec.interval}" if spec.interval else ""
                lines.append(f"{prefix}{name}  {spec.types}  {default}{bounds}  {spec.help}")

    walk(SCHEMA, "")
    return lines


def schema_entry(dotted):
    """The ``Key`` or ``Section`` of a dotted name, or None when the schema has none."""
    spec = SCHEMA
    for part in dotted.split("."):
        if not isinstance(spec, Section) or part not in spec.keys:
            return None
        spec = spec.keys[part]
    return spec


_YAML_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<name>[A-Za-z0-9_]+):(?P<value>.*?)(?:\s+#\s?(?P<comment>.*))?$")


def comment_mismatches(path):
    """["<file>:<line>: <problem>"] for every key of a YAML file whose comment does not start with the
    schema's help text of that key (sections included), or that has no comment or no schema entry."""
    problems = []
    stack = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            match = _YAML_KEY_LINE.match(line.rstrip("\n"))
            if match is None:
                continue  # a continuation line of a value
            stack = stack[:len(match.group("indent")) // 2] + [match.group("name")]
            dotted = ".".join(stack)
            spec = schema_entry(dotted)
            comment = (match.group("comment") or "").strip()
            if spec is None:
                problems.append(f"{path}:{number}: '{dotted}' is not in the schema")
            elif not spec.help or not comment.startswith(spec.help):
                problems.append(f"{path}:{number}: the comment of '{dotted}' must start with the schema's help "
                                f"text {spec.help!r}, got {comment!r}")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description="The config schema: describe it, or check config files.")
    parser.add_argument("--describe", action="store_true", help="print every key: type, default, range, help")
    parser.add_argument("--check", nargs="+", metavar="YAML", default=[],
                        help="validate these config files and their comments against the schema")
    args = parser.parse_args(argv)
    if not args.describe and not args.check:
        parser.error("give --describe or --check FILE ...")
    if args.describe:
        print("\n".join(describe_schema()))
    problems = []
    for path in args.check:
        try:
            load_config(path)
        except ConfigError as error:
            problems.append(str(error))
            continue
        problems.extend(comment_mismatches(path))
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
