"""End-to-end speed of CPABMM against a TPS motion model, measured side by side in one run.

    python -m bench.speed --device cuda          # the GPU table: vox-256 at full size (bs 8, 256x256)
    python -m bench.speed --device cpu --threads 1   # reduced sizes, labelled as such
    python -m bench.speed --quick                # CI smoke test: tiny sizes, every row, seconds

Rows: ``motion: tps``; ``motion: cpab`` with ``fit_method: adam`` (faithful, the official fit);
``motion: cpab`` with ``fit_method: gauss_newton`` (fast). For each, from ``config/vox-256.yaml``:
(a) one training step, ``train.training_step`` as ``train.train`` calls it (forward of
``GeneratorFullModel`` at the epoch ``bg_start``, so the BG predictor and the dropout softmax are on;
the loss check; backward, clipping, both Adam steps), without the
structure (DINO) and SAM losses ("step"), and with the structure loss ("+struct"); the SAM loss is
timed on its own (forward and backward into the keypoints, motion-independent table);
(b) animating one frame at batch 1 (``animation.Animator`` as the demo uses it, mode standard, no
background motion: the source keypoints are cached,
each call runs the kp detector on the driving frames, dense motion and the generator) and frames per
second for one batch of 64 driving frames; (c) peak GPU memory (CUDA only).
Every CPAB row shows its ratio to the TPS row measured with the same switches (time ratios: 1.10
means 10% slower than TPS). Switch rows, each next to the full-fidelity one: bf16 autocast
(``train_params.amp``), ``train_params.channels_last``, both; for the frozen encoders: SAM at a reduced
input size (``sam_params.input_size``: the loss builds the encoder natively at that size, resampling the
checkpoint's position embeddings), SAM /
DINO in bf16 (``sam_params.dtype``, ``structure_params.dtype``), SAM every N steps
(``sam_params.every_n_steps``: cost / N in the encoder table); and the full loss set with every switch
on, timed over cycles of N real training steps.

Weights are random (``train_params.pretrained.allow_random_weights: true``; speed does not depend on
them), inputs are random tensors, no data set is read. Times are the median of the timed repeats after
the warm-up ones, with ``torch.cuda.synchronize()`` before and after each repeat on CUDA. A row that
fails prints ``failed: <error>`` and the run goes on; without segment-anything the SAM rows print
``skipped: segment_anything is not installed``.

On CPU the sizes are REDUCED (printed in the header: 64x64 inputs, batch 2, narrower networks, 10 fit
iterations, small SAM / DINO / VGG stand-ins of the same classes) and the bf16 and channels_last rows
are skipped unless ``--cpu-switches`` (bf16 convolutions are emulated on CPUs without bf16 units, and
CPU memory formats say nothing about a GPU).
On a shared CPU pass ``--threads 1``: oversubscribed OpenMP threads spin and slow everything tenfold.
"""
import argparse
import copy
import functools
import json
import math
import statistics
import sys
import time

import torch
from timm.models.vision_transformer import VisionTransformer
from torchvision.models.vgg import cfgs, make_layers

from animation import Animator
from configuration import load_config
from full_model import GeneratorFullModel, resolve_pretrained_files
from losses.keypoint_semantic import KeypointSemanticLoss, build_sam_image_encoder
from losses.perceptual import PerceptualLoss, build_vgg19_features
from losses.structure import StructureLoss, build_dino_vitb8
from modules import MAIN_NETWORKS, build_networks
from train import Distributed, make_optimizers, training_step

CONFIG = "config/vox-256.yaml"
MOTIONS = (
    ("tps", ("model_params.dense_motion_params.motion=tps",)),
    ("cpab-adam", ("model_params.dense_motion_params.motion=cpab",
                   "model_params.dense_motion_params.cpab.fit_method=adam")),
    ("cpab-gn", ("model_params.dense_motion_params.motion=cpab",
                 "model_params.dense_motion_params.cpab.fit_method=gauss_newton")),
)
MOTION_HELP = {"tps": "TPSMM thin-plate splines", "cpab-adam": "CPAB, Adam fit (faithful)",
               "cpab-gn": "CPAB, Gauss-Newton fit (fast)"}
SWITCHES = (
    ("fp32", dict(amp=False, channels_last=False)),
    ("amp", dict(amp=True, channels_last=False)),
    ("channels_last", dict(amp=False, channels_last=True)),
    ("amp+channels_last", dict(amp=True, channels_last=True)),
)
SKIPPED_BF16 = "skipped on CPU: bf16 is emulated (--cpu-switches)"
SKIPPED_SWITCH = "skipped on CPU: not indicative of a GPU (--cpu-switches)"
BASE_OVERRIDES = ("train_params.pretrained.allow_random_weights=true",)
# The reduced (CPU) and tiny (--quick) sizes: config overrides, tensors, stand-in frozen encoders.
REDUCED_OVERRIDES = (
    "train_params.scales=[1, 0.5, 0.25]",
    "model_params.generator_params.block_expansion=16", "model_params.generator_params.max_features=128",
    "model_params.dense_motion_params.block_expansion=16", "model_params.dense_motion_params.max_features=128",
    "model_params.dense_motion_params.num_blocks=3", "model_params.dense_motion_params.cpab.max_iter=10",
    "model_params.dense_motion_params.cpab.gn_iter=5",
)
QUICK_OVERRIDES = (
    "model_params.common_params.num_cpab=2", "train_params.scales=[1, 0.5]",
    "model_params.generator_params.block_expansion=8", "model_params.generator_params.max_features=32",
    "model_params.dense_motion_params.block_expansion=8", "model_params.dense_motion_params.max_features=32",
    "model_params.dense_motion_params.num_blocks=2", "model_params.generator_params.num_down_blocks=2",
    "model_params.dense_motion_params.cpab.max_iter=2", "model_params.dense_motion_params.cpab.gn_iter=1",
)


def sizes(quick, on_cuda):
    """Benchmark sizes: full vox-256 shapes on CUDA, reduced on CPU, tiny with ``quick``.

    cycle_warmup / cycle_repeats: warm-up and timed cycles of the SAM-every-N rows (each cycle is N
    real steps; on CPU the networks are already warm from the rows before).
    """
    if quick:
        return dict(label="QUICK (CI smoke test: tiny sizes, one repeat, numbers meaningless)",
                    overrides=QUICK_OVERRIDES, image=32, batch=2, anim_batch=2, warmup=0, repeats=1, encoders="tiny",
                    sam_full=32, sam_reduced=16, vgg_width=16, sam_every=2, cycle_warmup=0, cycle_repeats=1)
    if on_cuda:
        return dict(label="full (vox-256: 256x256, training batch 8, animation batches 1 and 64)", overrides=(),
                    image=256, batch=8, anim_batch=64, warmup=3, repeats=10, encoders="full", sam_full=1024,
                    sam_reduced=512, vgg_width=1, sam_every=4, cycle_warmup=1, cycle_repeats=3)
    return dict(label="REDUCED for CPU (64x64 inputs, training batch 2 instead of 8, animation batch 8 instead of "
                      "64, perceptual pyramid 1, 1/2, 1/4, narrower hourglass (3 blocks) and generator, 10 Adam / "
                      "5 Gauss-Newton fit iterations, VGG-19 layout with 1/4 channels, SAM / DINO stand-ins: 2-block "
                      "ViTs at 128 / 56 px)",
                overrides=REDUCED_OVERRIDES, image=64, batch=2, anim_batch=8, warmup=1, repeats=2, encoders="small",
                sam_full=128, sam_reduced=64, vgg_width=4, sam_every=2, cycle_warmup=0, cycle_repeats=1)


# ----------------------------------------------------------------------------- timing
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, warmup, repeats):
    """(median seconds of ``repeats`` calls after ``warmup`` calls, peak GPU bytes of the timed calls or None)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return statistics.median(times), peak


# ----------------------------------------------------------------------------- frozen encoders
def _sam_encoder_at(img_size, tiny):
    """A random SAM ``ImageEncoderViT`` built for ``img_size`` inputs: ViT-B's layout, or a 2-block stand-in."""
    # segment-anything is optional (the GPU box may lack it): without it the SAM rows say so and the rest runs.
    from segment_anything.modeling import ImageEncoderViT

    if tiny:
        return ImageEncoderViT(img_size=img_size, patch_size=16 if img_size >= 64 else 8, embed_dim=64, depth=2,
                               num_heads=2, out_chans=32, use_rel_pos=True, window_size=4, global_attn_indexes=(1,))
    return ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=768, depth=12, num_heads=12, out_chans=256,
                           mlp_ratio=4, qkv_bias=True, use_rel_pos=True, window_size=14,
                           global_attn_indexes=(2, 5, 8, 11),
                           norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))


class Encoders:
    """The frozen pretrained models, built once and shared by the rows (one copy per dtype); the SAM
    encoder on first use (segment-anything is optional)."""

    def __init__(self, config, size, device):
        tp = config["train_params"]
        self.size = size
        self.device = device
        self.num_keypoints = 5 * config["model_params"]["common_params"]["num_cpab"]
        self.sam = None
        if size["encoders"] == "full":
            files = resolve_pretrained_files(tp)  # local weight files if present, else random (allowed)
            self.vgg = build_vgg19_features(files.get("vgg19"))
            self._build_sam = functools.partial(build_sam_image_encoder, tp["pretrained"]["sam_model_type"],
                                                files.get("sam_checkpoint"))
            self.dino = build_dino_vitb8(files.get("dino_vitb8"))
            self.dino_args = dict()
        else:
            w = size["vgg_width"]
            self.vgg = make_layers([v if v == "M" else v // w for v in cfgs["E"]]).requires_grad_(False).eval()
            self._build_sam = functools.partial(_sam_encoder_at, size["sam_full"], tiny=True)
            dino_size = 56 if size["encoders"] == "small" else 32
            self.dino = VisionTransformer(img_size=dino_size, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                          num_classes=0, dynamic_img_size=True).requires_grad_(False).eval()
            self.dino_args = dict(layer=1, size=dino_size, max_size=2 * dino_size)
        self.vgg.to(device)
        self._sam = {}
        self._dino = {}

    def sam_encoder(self, dtype):
        """The SAM encoder in ``dtype`` (one copy per dtype)."""
        if self.sam is None:
            self.sam = self._build_sam().requires_grad_(False).eval()
        if dtype not in self._sam:
            self._sam[dtype] = copy.deepcopy(self.sam).to(device=self.device, dtype=dtype)
        return self._sam[dtype]

    def sam_loss(self, input_size, dtype, every_n_steps=1):
        """The SAM loss at ``input_size`` (a reduced size builds its own encoder, as training does)."""
        return KeypointSemanticLoss(self.sam_encoder(dtype), input_size=input_size, dtype=dtype,
                                    every_n_steps=every_n_steps).to(self.device)

    def structure_loss(self, dtype):
        if dtype not in self._dino:
            self._dino[dtype] = copy.deepcopy(self.dino).to(device=self.device, dtype=dtype)
        return StructureLoss(self._dino[dtype], dtype=dtype, **self.dino_args).to(self.device)

    def losses(self, train_params, sam_loss=None, structure_loss=None):
        """The ``losses`` dict ``GeneratorFullModel`` expects for ``train_params``' enabled losses."""
        losses = {"perceptual": PerceptualLoss(self.vgg, scales=train_params["scales"], num_channels=3).to(self.device)}
        if sam_loss is not None:
            losses["sam"] = sam_loss
        if structure_loss is not None:
            losses["structure"] = structure_loss
        return losses


# ----------------------------------------------------------------------------- rows
def load(config_path, overrides):
    return load_config(config_path, overrides=list(overrides))


def set_memory_format(networks, channels_last):
    """``train_params.channels_last`` as ``train.train`` applies it: the main networks' 4-D weights in
    channels_last (or back to contiguous when off)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for name in MAIN_NETWORKS:
        if networks.get(name) is not None:
            networks[name].to(memory_format=memory_format)


def inputs(batch, size, device, channels_last, seed):
    generator = torch.Generator().manual_seed(seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return {key: torch.rand(batch, 3, size, size, generator=generator).to(device).contiguous(
        memory_format=memory_format) for key in ("source", "driving")}


def build_trainer(networks, config, losses):
    """A callable x -> None running ``train.training_step`` as ``train.train`` does (fresh optimisers,
    a step counter that advances, so ``sam_params.every_n_steps`` applies)."""
    params = config["train_params"]
    device = next(networks["kp_detector"].parameters()).device
    model = GeneratorFullModel(networks, params, losses=losses).to(device).train()
    optimizers = make_optimizers(networks, params)
    epoch = params["bg_start"]
    dist = Distributed()
    state = {"step": 0}

    def step(x):
        index = state["step"]
        training_step(model, networks, optimizers, x, epoch, index, params, dist)
        state["step"] = index + 1

    return step


def time_training(networks, config, losses, size, device, cycle=1, warmup=None):
    """Median seconds per training step (over cycles of ``cycle`` steps) and the peak GPU bytes."""
    channels_last = config["train_params"]["channels_last"]
    set_memory_format(networks, channels_last)
    step = build_trainer(networks, config, losses)
    x = inputs(size["batch"], size["image"], device, channels_last, seed=0)

    def run():
        for _ in range(cycle):
            step(x)

    repeats = size["repeats"] if cycle == 1 else size["cycle_repeats"]
    seconds, peak = measure(run, device, size["warmup"] if warmup is None else warmup, repeats)
    return seconds / cycle, peak


def time_animation(networks, config, size, device):
    """(seconds for one frame at batch 1, seconds for a batch of ``anim_batch`` frames, peak bytes of the batch)."""
    amp, channels_last = config["train_params"]["amp"], config["train_params"]["channels_last"]
    set_memory_format(networks, channels_last)
    for network in networks.values():
        if network is not None:
            network.eval()
    source = inputs(1, size["image"], device, channels_last, seed=1)["source"]
    one = inputs(1, size["image"], device, channels_last, seed=2)["driving"]
    many = inputs(size["anim_batch"], size["image"], device, channels_last, seed=3)["driving"]
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)
    with torch.inference_mode(), autocast:
        animator = Animator(networks, source, "standard", background=False)
        frame, _ = measure(lambda: animator(one), device, size["warmup"], size["repeats"])
        batch, peak = measure(lambda: animator(many), device, min(size["warmup"], 1), max(1, size["repeats"] // 2))
    return frame, batch, peak


def with_losses(config, sam=False, structure=False, sam_params=None, structure_dtype=None):
    """A copy of ``config`` with the SAM / structure loss weights on or off (their configured weights)."""
    config = copy.deepcopy(config)
    tp = config["train_params"]
    if not sam:
        tp["loss_weights"]["sam"] = 0
    if not structure:
        tp["loss_weights"]["structure"] = 0
    if sam_params is not None:
        tp["sam_params"].update(sam_params)
    if structure_dtype is not None:
        tp["structure_params"]["dtype"] = structure_dtype
    return config


def switched(config, amp, channels_last):
    config = copy.deepcopy(config)
    config["train_params"]["amp"] = amp
    config["train_params"]["channels_last"] = channels_last
    return config


def _error(error):
    text = str(error).strip().splitlines()
    return f"failed: {type(error).__name__}: {text[0][:120] if text else ''}"


def guarded(fn):
    """fn() or the one-line failure text (a failing row must not stop the benchmark)."""
    try:
        return fn()
    except ImportError as error:  # an optional dependency (segment-anything) is not installed
        return f"skipped: {error.name or error} is not installed"
    except (RuntimeError, TypeError, ValueError, ArithmeticError) as error:
        return _error(error)


def motion_rows(networks, config, switch, encoders, size, device):
    """{'step', 'struct', 'anim'} of one motion model with one set of switches (or failure texts)."""
    config = switched(config, **switch)
    plain = with_losses(config)
    structured = with_losses(config, structure=True)
    return {
        "step": guarded(lambda: time_training(networks, plain, encoders.losses(plain["train_params"]), size, device)),
        "struct": guarded(lambda: time_training(
            networks, structured, encoders.losses(structured["train_params"],
                                                  structure_loss=encoders.structure_loss(torch.float32)),
            size, device)),
        "anim": guarded(lambda: time_animation(networks, config, size, device)),
    }


def full_loss_rows(networks, config, encoders, size, device, run_switches, every):
    """Training step with every loss on: faithful, and with every speed switch on (cycles of ``every`` steps)."""
    full_px, reduced_px = size["sam_full"], size["sam_reduced"]
    faithful = with_losses(config, sam=True, structure=True)
    fast_dtype = "bfloat16" if run_switches else "float32"
    fast = with_losses(switched(config, amp=run_switches, channels_last=run_switches), sam=True, structure=True,
                       sam_params=dict(input_size=reduced_px, dtype=fast_dtype, every_n_steps=every),
                       structure_dtype=fast_dtype)
    return {
        "faithful": guarded(lambda: time_training(
            networks, faithful, encoders.losses(faithful["train_params"],
                                                sam_loss=encoders.sam_loss(full_px, torch.float32),
                                                structure_loss=encoders.structure_loss(torch.float32)),
            size, device, warmup=size["cycle_warmup"])),
        "switches on": guarded(lambda: time_training(
            networks, fast, encoders.losses(fast["train_params"],
                                            sam_loss=encoders.sam_loss(reduced_px, getattr(torch, fast_dtype), every),
                                            structure_loss=encoders.structure_loss(getattr(torch, fast_dtype))),
            size, device, cycle=every, warmup=size["cycle_warmup"])),
    }


def time_sam(encoders, size, device, input_size, dtype):
    """Seconds of the SAM loss alone on the 2 x batch frames of a step (forward + backward to the keypoints)."""
    loss_fn = encoders.sam_loss(input_size, dtype)
    x = inputs(size["batch"], size["image"], device, False, seed=4)
    generator = torch.Generator().manual_seed(5)
    num_kp = encoders.num_keypoints
    kp_s = (torch.rand(size["batch"], num_kp, 2, generator=generator) * 2 - 1).to(device).requires_grad_()
    kp_d = (torch.rand(size["batch"], num_kp, 2, generator=generator) * 2 - 1).to(device).requires_grad_()

    def run():
        loss_fn(x["source"], x["driving"], kp_s, kp_d).backward()

    return measure(run, device, size["warmup"], size["repeats"])


def time_structure(encoders, size, device, dtype):
    """Seconds of the structure loss alone (forward + backward to the prediction) at the step's batch."""
    loss_fn = encoders.structure_loss(dtype)
    x = inputs(size["batch"], size["image"], device, False, seed=6)
    prediction = x["source"].clone().requires_grad_()

    def run():
        loss_fn(prediction, x["driving"]).backward()

    return measure(run, device, size["warmup"], size["repeats"])


# ----------------------------------------------------------------------------- formatting
def ms(value):
    return f"{value * 1e3:.1f}" if isinstance(value, float) else "-"


def ratio(value, reference):
    if isinstance(value, float) and isinstance(reference, float) and reference > 0:
        return f"{value / reference:.2f}x"
    return "-"


def mib(value):
    return f"{value / 2 ** 20:.0f}" if isinstance(value, int) else "n/a"


def first(entry, index):
    """entry[index] of a measured tuple, or None for a failed / skipped entry."""
    return entry[index] if isinstance(entry, tuple) else None


def table(header, rows):
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = [" | ".join(str(cell).ljust(width) for cell, width in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * width for width in widths))
    lines.extend(" | ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(lines)


def failures(rows_by_name):
    """'  row [column]: failed: ...' for every failed entry (skipped ones are explained in the tables)."""
    notes = []
    for name, result in rows_by_name.items():
        for column, value in result.items():
            if isinstance(value, str) and value.startswith("failed"):
                notes.append(f"  {name} [{column}]: {value}")
    return notes


def frozen_rows(encoders, size, device, run_bf16, every):
    """SAM / DINO loss timings alone ({row: (seconds, peak) or text}) and the faithful SAM row's name."""
    full_px, reduced_px = size["sam_full"], size["sam_reduced"]
    sam_rows = [(f"sam fp32 @{full_px} (faithful)", full_px, torch.float32),
                (f"sam bf16 @{full_px}", full_px, torch.bfloat16),
                (f"sam fp32 @{reduced_px}", reduced_px, torch.float32),
                (f"sam bf16 @{reduced_px}", reduced_px, torch.bfloat16)]
    frozen = {}
    for row, input_size, dtype in sam_rows:
        if dtype == torch.bfloat16 and not run_bf16:
            frozen[row] = SKIPPED_BF16
            continue
        frozen[row] = guarded(functools.partial(time_sam, encoders, size, device, input_size, dtype))
    source = sam_rows[3][0] if run_bf16 else sam_rows[2][0]
    amortised = frozen[source]
    frozen[f"sam every {every} steps ({source.split(' ', 1)[1]}), amortised"] = (
        (amortised[0] / every, None) if isinstance(amortised, tuple) else amortised)
    frozen["dino fp32 (faithful)"] = guarded(lambda: time_structure(encoders, size, device, torch.float32))
    frozen["dino bf16"] = (guarded(lambda: time_structure(encoders, size, device, torch.bfloat16)) if run_bf16
                           else SKIPPED_BF16)
    return frozen, sam_rows[0][0]


def motion_table(results, size):
    header = ["row", "step ms", "xTPS", "vs fp32", "+struct ms", "xTPS", "frame ms (bs1)", "xTPS",
              f"fps (bs {size['anim_batch']})", "xTPS", "peak MiB step+struct", "peak MiB anim"]
    lines = []
    for switch_name, _ in SWITCHES:
        tps = results[f"tps {switch_name}"]
        for motion, _ in MOTIONS:
            row = f"{motion} {switch_name}"
            r = results[row]
            step, struct, anim = first(r["step"], 0), first(r.get("struct"), 0), r.get("anim")
            frame, batch = first(anim, 0), first(anim, 1)
            fps = f"{size['anim_batch'] / batch:.1f}" if batch else "-"
            lines.append([row, ms(step), ratio(step, first(tps["step"], 0)),
                          ratio(step, first(results[f"{motion} fp32"]["step"], 0)),
                          ms(struct), ratio(struct, first(tps.get("struct"), 0)),
                          ms(frame), ratio(frame, first(tps.get("anim"), 0)), fps,
                          ratio(batch, first(tps.get("anim"), 1)),
                          mib(first(r.get("struct"), 1)), mib(first(anim, 2))])
    return table(header, lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--config", default=CONFIG, help=f"config (default: {CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every row")
    parser.add_argument("--quick", action="store_true", help="CI smoke test: tiny sizes, one repeat")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (use 1 on a shared CPU)")
    parser.add_argument("--sam-every", type=int, default=None,
                        help="N of the SAM-every-N-steps rows (default 4; 2 with --quick)")
    parser.add_argument("--cpu-switches", action="store_true",
                        help="also time the bf16 and channels_last rows on CPU (slow, not indicative of a GPU)")
    parser.add_argument("--json", default=None, help="also write every measured number to this JSON file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available here; use --device cpu")
    size = sizes(args.quick, device.type == "cuda")
    base = {"path": args.config, "overrides": list(BASE_OVERRIDES) + list(size["overrides"]) + args.overrides}
    config = load(base["path"], base["overrides"])
    tp = config["train_params"]
    run_switches = device.type == "cuda" or args.cpu_switches
    started = time.perf_counter()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"CPABMM speed benchmark (python -m bench.speed) on {name}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {sys.version.split()[0]}")
    print(f"sizes: {size['label']}")
    print(f"config: {args.config} with overrides {base['overrides']}")
    print("rows: " + "; ".join(f"{row}: {list(overrides)}" for row, overrides in MOTIONS))
    print(f"timing: median of {size['repeats']} repeats after {size['warmup']} warm-up ({size['anim_batch']}-frame "
          f"batch: half the repeats), training at epoch bg_start={tp['bg_start']}, random weights and inputs")
    sys.stdout.flush()

    encoders = Encoders(config, size, device)
    every = args.sam_every if args.sam_every is not None else size["sam_every"]
    frozen, sam_reference = frozen_rows(encoders, size, device, run_switches, every)
    results, full_set = {}, {}
    for motion, overrides in MOTIONS:
        motion_config = load(base["path"], base["overrides"] + list(overrides))
        networks = build_networks(motion_config, device)
        for switch_name, switch in SWITCHES:
            row = f"{motion} {switch_name}"
            if switch_name != "fp32" and not run_switches:
                results[row] = {"step": SKIPPED_BF16 if switch["amp"] else SKIPPED_SWITCH}
                continue
            results[row] = motion_rows(networks, motion_config, switch, encoders, size, device)
        for kind, value in full_loss_rows(networks, motion_config, encoders, size, device, run_switches, every).items():
            full_set[f"{motion} all losses, {kind}"] = value
        del networks

    print("\n(a)+(b)+(c) training step, animation, memory; xTPS = time / the TPS row with the same switches; "
          "vs fp32 = time / the same motion in fp32")
    if not run_switches:
        print(f"amp and channels_last rows: {SKIPPED_BF16}; {SKIPPED_SWITCH}")
    print(motion_table(results, size))
    print(f"\nfrozen-encoder losses alone at the step's batch ({2 * size['batch']} SAM frames, {size['batch']} DINO "
          f"frames), forward + backward; x faithful = time / the fp32 row of the same encoder")
    lines = []
    for row, value in frozen.items():
        reference = frozen[sam_reference] if row.startswith("sam") else frozen["dino fp32 (faithful)"]
        lines.append([row, ms(first(value, 0)) if isinstance(value, tuple) else value,
                      ratio(first(value, 0), first(reference, 0)), mib(first(value, 1))])
    print(table(["row", "ms", "x faithful", "peak MiB"], lines))

    fast_dtype = "bfloat16" if run_switches else "float32"
    switches_text = (f"{'amp, channels_last, ' if run_switches else ''}SAM {fast_dtype} @{size['sam_reduced']} every "
                     f"{every} steps, DINO {fast_dtype}")
    print(f"\nfull loss set (perceptual, equivariance, warp, bg, structure, SAM) per training step; switches on = "
          f"{switches_text} (timed over cycles of {every} real steps); xTPS as above; the target on one H100: "
          f"<= 400 ms with the switches on")
    lines = []
    for motion, _ in MOTIONS:
        for kind in ("faithful", "switches on"):
            value = full_set[f"{motion} all losses, {kind}"]
            lines.append([f"{motion} all losses, {kind}", ms(first(value, 0)),
                          ratio(first(value, 0), first(full_set[f"tps all losses, {kind}"], 0)), mib(first(value, 1))])
    print(table(["row", "step ms", "xTPS", "peak MiB"], lines))
    notes = failures(results) + failures({"frozen": frozen}) + failures({"full": full_set})
    if notes:
        print("\nfailed:")
        print("\n".join(notes))
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")

    if args.json:
        record = {"device": name, "torch": torch.__version__, "sizes": size["label"], "config": args.config,
                  "overrides": base["overrides"], "rows": {}}
        for group in (results, frozen, full_set):
            for row, value in group.items():
                record["rows"][row] = _jsonable(value)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
    return 0


def _jsonable(value):
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
