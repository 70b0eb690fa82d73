"""Strict YAML configuration: schema, loader, command-line overrides.

Every config in ``config/`` is validated against ``SCHEMA`` below. An unknown or misspelt key, a
missing required key or a value of the wrong type raises ``ConfigError`` with one line that names
the dotted key and the file (and the closest valid key for a misspelling). ``load_config`` returns
a plain nested dict in which every key of the schema is present: keys a file leaves out get the
documented default (the official vox-256 value unless the description says otherwise).

Type specs are strings: ``int``, ``float`` (an int is accepted and converted), ``bool``, ``str``,
``null``, ``list[int]``, ``list[float]``, joined by ``|`` for alternatives (``str|null``).
"""

import copy
import difflib
import os
from dataclasses import dataclass

import yaml

REQUIRED = object()


class ConfigError(ValueError):
    """A config file or override is invalid; the message is one line naming the key and the file."""


@dataclass(frozen=True)
class Key:
    """One leaf key: type spec, default (``REQUIRED`` = must be given), description, constraints."""

    types: str
    default: object = REQUIRED
    help: str = ""
    choices: tuple = ()
    length: tuple = ()


@dataclass(frozen=True)
class Section:
    """A mapping of keys. ``nullable``: the section may be ``null`` (its default is then ``None``)."""

    keys: dict
    help: str = ""
    nullable: bool = False
    required: bool = False


_DTYPES = ("float32", "bfloat16")

SCHEMA = Section(required=True, keys={
    "dataset_params": Section(required=True, help="where the videos are and how they are sampled", keys={
        "root_dir": Key("str", help="FOMM layout: <root_dir>/train/<video>, <root_dir>/test/<video>"),
        "frame_shape": Key("list[int]|null", None, "[H, W, C] or [H, W] of a frame; needed for .png/.jpg strips",
                           length=(2, 3)),
        "id_sampling": Key("bool", False, "sample a person id first, then one of its videos (id#video#clip)"),
        "pairs_list": Key("str|null", None, "CSV (columns source,driving) of animation pairs; null = random pairs"),
        "synthetic": Section(nullable=True, help="parameters of the embedded synthetic generator (synthetic.py)",
                             keys={
            "seed": Key("int", 0, "generator seed; same seed -> identical frames"),
            "num_train": Key("int", 256, "videos in <root_dir>/train"),
            "num_test": Key("int", 32, "videos in <root_dir>/test"),
            "num_frames": Key("int", 32, "frames per video"),
            "size": Key("int", 64, "frame height = width in pixels"),
            "format": Key("str", "mp4", "mp4 (lossy, small) or frames (lossless png folders)",
                          choices=("mp4", "frames")),
        }),
        "augmentation_params": Section(help="training augmentation, identical for source and driving", keys={
            "flip_param": Section(nullable=True, help="random flips", keys={
                "horizontal_flip": Key("bool", False, "mirror both frames with p = 0.5"),
                "time_flip": Key("bool", False, "swap source and driving with p = 0.5"),
            }),
            "resize_param": Section(nullable=True, help="random rescale (MGif)", keys={
                "ratio": Key("list[float]", help="[min, max] scale factor drawn uniformly", length=(2,)),
            }),
            "crop_param": Section(nullable=True, help="random crop, edge-padded when smaller (MGif)", keys={
                "size": Key("list[int]", help="[H, W] of the crop", length=(2,)),
            }),
            "jitter_param": Section(nullable=True, help="colour jitter (torchvision factors)", keys={
                "brightness": Key("float", 0.0, "factor in [max(0, 1 - b), 1 + b]; 0 = off"),
                "contrast": Key("float", 0.0, "factor in [max(0, 1 - c), 1 + c]; 0 = off"),
                "saturation": Key("float", 0.0, "factor in [max(0, 1 - s), 1 + s]; 0 = off"),
                "hue": Key("float", 0.0, "shift in [-h, h] (at most 0.5); 0 = off"),
            }),
        }),
    }),
    "model_params": Section(required=True, help="network shapes", keys={
        "common_params": Section(required=True, keys={
            "num_cpab": Key("int", help="K: groups of 5 keypoints, one partial CPAB warp each (official: num_tps)"),
            "num_channels": Key("int", 3, "image channels"),
            "bg": Key("bool", True, "background affine predictor on"),
            "multi_mask": Key("bool", True, "4 occlusion masks at 1/8, 1/4, 1/2, 1 of the input resolution"),
        }),
        "generator_params": Section(keys={
            "block_expansion": Key("int", 64, "channels of the first encoder level"),
            "max_features": Key("int", 512, "channel cap of the encoder/decoder"),
            "num_down_blocks": Key("int", 3, "encoder levels"),
        }),
        "dense_motion_params": Section(keys={
            "block_expansion": Key("int", 64, "hourglass width"),
            "max_features": Key("int", 1024, "hourglass channel cap"),
            "num_blocks": Key("int", 5, "hourglass depth"),
            "scale_factor": Key("float", 0.25, "dense motion resolution relative to the input"),
            "kp_variance": Key("float", 0.01, "variance of the Gaussian keypoint heatmaps"),
            "motion": Key("str", "cpab", "cpab or tps (TPSMM thin-plate splines)", choices=("cpab", "tps")),
            "global_cpab": Key("bool", True, "add the global warp fitted to all 5K keypoint pairs"),
            "partial_tess_size": Key("list[int]", [4, 4], "tessellation of the K partial warps", length=(2,)),
            "global_tess_size": Key("list[int]", [6, 6], "tessellation of the global warp", length=(2,)),
            "zero_boundary": Key("bool", False, "velocity 0 on the border (False: libcpab's valid-outside)"),
            "volume_preservation": Key("bool", False, "trace-0 cells"),
            "fit_method": Key("str", "adam", "adam (official) or gauss_newton", choices=("adam", "gauss_newton")),
            "max_iter": Key("int", 100, "Adam steps of the partial fits"),
            "global_iter_multiplier": Key("float", 1.5, "the global fit runs max_iter * this many steps"),
            "fit_lr": Key("float", 0.01, "Adam learning rate of the fit"),
            "theta_init": Key("float", 1.0e-6, "constant initial theta of the Adam fit"),
            "gn_iter": Key("int", 10, "gauss_newton iterations"),
            "gn_damping": Key("float", 1.0e-3, "gauss_newton Tikhonov weight on theta"),
            "detach_keypoints": Key("bool", True, "no gradient from the warps into the keypoints"),
        }),
        "avd_network_params": Section(keys={
            "id_bottle_size": Key("int", 128, "identity code size"),
            "pose_bottle_size": Key("int", 128, "pose code size"),
        }),
    }),
    "train_params": Section(required=True, help="main training", keys={
        "num_epochs": Key("int", help="epochs"),
        "num_repeats": Key("int", help="DatasetRepeater: passes over the training videos per epoch"),
        "epoch_milestones": Key("list[int]", [70, 90], "MultiStepLR x0.1 at each"),
        "lr_generator": Key("float", help="Adam lr of kp detector + dense motion + generator (+ BG predictor)"),
        "batch_size": Key("int", help="batch size"),
        "scales": Key("list[float]", [1.0, 0.5, 0.25, 0.125], "perceptual pyramid scales"),
        "dataloader_workers": Key("int", 12, "DataLoader worker processes"),
        "checkpoint_freq": Key("int", 50, "numbered checkpoint every N epochs"),
        "log_freq": Key("int", 100, "TensorBoard scalars every N iterations"),
        "image_freq": Key("int", 1000, "TensorBoard image grids every N iterations"),
        "max_steps_per_epoch": Key("int|null", None, "cap on iterations per epoch; null = no cap"),
        "evaluate_after_training": Key("bool", False, "run the test-split reconstruction after training"),
        "eval_batch_size": Key("int", 32, "frames per forward pass in reconstruction (one video at a time)"),
        "dropout_epoch": Key("int", 35, "dropout softmax while epoch < this"),
        "dropout_maxp": Key("float", 0.3, "final dropout probability"),
        "dropout_startp": Key("float", 0.1, "initial dropout probability"),
        "dropout_inc_epoch": Key("int", 10, "epochs to go from dropout_startp to dropout_maxp"),
        "bg_start": Key("int", 10, "epoch from which the BG predictor is used and trained"),
        "clip_grad_norm": Key("float|null", 10.0, "max-norm (inf norm) gradient clipping; null = off"),
        "amp": Key("bool", False, "bf16 autocast"),
        "channels_last": Key("bool", False, "channels_last memory format"),
        "transform_params": Section(keys={
            "sigma_affine": Key("float", 0.05, "affine part of the random TPS"),
            "sigma_tps": Key("float", 0.005, "deformation part of the random TPS"),
            "points_tps": Key("int", 5, "control grid points per side"),
        }),
        "loss_weights": Section(keys={
            "perceptual": Key("list[float]", [10.0] * 5, "one weight per VGG-19 layer", length=(5,)),
            "equivariance_value": Key("float", 10.0, "equivariance loss"),
            "warp_loss": Key("float", 10.0, "warp loss"),
            "bg": Key("float", 10.0, "background cycle loss"),
            "sam": Key("float", 1.0, "SAM-guided keypoint semantic loss"),
            "structure": Key("float", 0.1, "DINO structure alignment loss"),
        }),
        "pretrained": Section(keys={
            "vgg19": Key("str|null", "weights/vgg19-dcbb9e9d.pth", "torchvision ImageNet VGG-19"),
            "dino_vitb8": Key("str|null", "weights/dino_vitbase8_pretrain.pth", "DINO ViT-B/8 backbone"),
            "sam_checkpoint": Key("str|null", "weights/sam_vit_b_01ec64.pth", "segment-anything checkpoint"),
            "sam_model_type": Key("str", "vit_b", "must match sam_checkpoint", choices=("vit_b", "vit_l", "vit_h")),
            "allow_random_weights": Key("bool", False, "missing weight files -> random weights (smoke tests)"),
        }),
        "sam_params": Section(keys={
            "input_size": Key("int", 1024, "long side fed to the SAM encoder"),
            "dtype": Key("str", "float32", "dtype of the frozen SAM encoder", choices=_DTYPES),
            "every_n_steps": Key("int", 1, "compute the SAM loss every N iterations"),
        }),
        "structure_params": Section(keys={
            "dtype": Key("str", "float32", "dtype of the frozen DINO model", choices=_DTYPES),
        }),
    }),
    "train_avd_params": Section(help="animation-via-disentanglement training", keys={
        "num_epochs": Key("int", 200, "epochs"),
        "num_repeats": Key("int", 300, "passes over the training videos per epoch"),
        "batch_size": Key("int", 256, "batch size"),
        "dataloader_workers": Key("int", 24, "DataLoader worker processes"),
        "checkpoint_freq": Key("int", 50, "numbered checkpoint every N epochs"),
        "epoch_milestones": Key("list[int]", [140, 180], "MultiStepLR x0.1 at each"),
        "lr": Key("float", 1.0e-3, "Adam learning rate"),
        "lambda_shift": Key("float", 1.0, "weight of the AVD reconstruction loss"),
        "lambda_affine": Key("float|null", None, "only in the official mgif config; kept for fidelity"),
        "random_scale": Key("float", 0.25, "scale of the random keypoint transform"),
    }),
    "eval_params": Section(help="protocol metrics of the reconstruction (evaluation/, pose-evaluation's)", keys={
        "metrics": Key("list[str]", ["l1"], "subset of l1, akd, mkr, aed (mkr needs domain body)"),
        "domain": Key("str", "face", "face: FAN landmarks + OpenFace; body: rtpose keypoints + re-ID ft_net",
                      choices=("face", "body")),
        "batch_size": Key("int", 16, "frames per extractor forward pass"),
        "weights": Section(help="published weight files of the extractors (never downloaded)", keys={
            "fan": Key("str|null", "weights/2DFAN4-11f355bf06.pth.tar", "face-alignment 2-D FAN-4"),
            "s3fd": Key("str|null", "weights/s3fd-619a316812.pth", "face-alignment's S3FD face detector"),
            "openface": Key("str|null", "weights/openface.pth", "OpenFace nn4.small2.v1 (OpenFacePytorch)"),
            "rtpose": Key("str|null", "weights/pose_model.pth", "rtpose VGG19 body pose"),
            "reid": Key("str|null", "weights/reid_model.pth", "person re-ID ft_net ResNet-50"),
        }),
        "allow_random_weights": Key("bool", False, "missing weight files -> random extractors (smoke tests)"),
    }),
    "visualizer_params": Section(help="image grids", keys={
        "kp_size": Key("int", 5, "keypoint disc radius in pixels"),
        "draw_border": Key("bool", True, "border around each image"),
        "colormap": Key("str", "gist_rainbow", "matplotlib colormap name for keypoints"),
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
    """Lines ``dotted.key  type  default  description`` of the whole schema (for docs and --help)."""
    lines = []

    def walk(section, prefix):
        for name, spec in section.keys.items():
            if isinstance(spec, Section):
                lines.append(f"{prefix}{name}  section{' or null' if spec.nullable else ''}  {spec.help}")
                walk(spec, prefix + name + ".")
            else:
                default = "required" if spec.default is REQUIRED else repr(spec.default)
                lines.append(f"{prefix}{name}  {spec.types}  {default}  {spec.help}")

    walk(SCHEMA, "")
    return lines
