"""Training drivers: the main networks (``train``) and the AVD network on frozen main networks (``train_avd``).

Both are one code path for a single process and for DDP (``torchrun --nproc_per_node=N run.py ...``):
a ``DistributedSampler`` splits each epoch's shuffled order between the ranks (one rank when not
distributed), and only rank 0 writes files (checkpoints, TensorBoard, progress bar).
``train_params.batch_size`` is the global batch: each of the N ranks gets batch_size / N samples.

Reproducibility: at the start of epoch e every rank seeds ``random``, NumPy and torch from
(seed, e, rank) and the sampler shuffles with (seed, e). A checkpoint holds the completed-epoch count,
so "train 2 epochs, save, resume 1 epoch" follows the same path as "train 3 epochs" (with
``dataloader_workers: 0``, or any worker count on the same machine, since worker seeds derive from
the per-epoch generator).
"""
import bisect
import collections
import math
import os
import random
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import MultiStepLR
from torch.utils.data import DataLoader, DistributedSampler

from checkpoint import CHECKPOINT_NAME, load_network_states, load_training_states, save_epoch, state_dicts
from frames_dataset import DatasetRepeater, dataset_from_config
from full_model import GeneratorFullModel
from logger import RunLog
from modules import MAIN_NETWORKS
from reconstruction import evaluate_test_split


class NonFiniteLossError(ArithmeticError):
    """A loss, the keypoints, a gradient or the weights became NaN/inf; training stopped before writing a
    checkpoint."""


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a (possibly one-process) job."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized: bool = False

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.initialized:
            torch.distributed.barrier()


def epoch_seed(seed, epoch, rank, stream=0):
    """A 63-bit seed derived from (seed, epoch, rank, stream) with NumPy's SeedSequence."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(rank), int(stream)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1]))


def seed_everything(value):
    """Seed Python's ``random``, NumPy's global generator and torch (all devices)."""
    random.seed(value)
    np.random.seed(value % (2 ** 32))
    torch.manual_seed(value)


def make_loader(dataset, batch_size, num_workers, seed, epoch, dist, device):
    """DataLoader over this rank's share of epoch ``epoch``'s shuffled order (full batches only)."""
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    generator = torch.Generator()
    generator.manual_seed(epoch_seed(seed, epoch, dist.rank, stream=1))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=True, pin_memory=device.type == "cuda", generator=generator)


def per_rank_batch(batch_size, dist, key):
    """Split the global batch between the ranks; one-line error when it does not divide."""
    if batch_size % dist.world_size != 0:
        raise ValueError(f"{key}={batch_size} is not divisible by the {dist.world_size} processes")
    return batch_size // dist.world_size


def training_dataset(config, num_repeats):
    """The repeated training split, with a one-line error when it is empty."""
    dataset = dataset_from_config(config["dataset_params"], is_train=True)
    if len(dataset) == 0:
        raise ValueError(f"dataset_params.root_dir: no training videos in "
                         f"{os.path.join(config['dataset_params']['root_dir'], 'train')}")
    return DatasetRepeater(dataset, num_repeats)


def steps_in_epoch(loader, max_steps, dataset_size, batch_size):
    """Iterations of one epoch: the full batches of this rank, capped by ``max_steps`` when set."""
    steps = len(loader)
    if steps == 0:
        raise ValueError(f"the (repeated) training set has {dataset_size} samples, fewer than one batch "
                         f"of {batch_size} per process: lower batch_size or raise num_repeats")
    return steps if max_steps is None else min(steps, max_steps)


def max_abs(tensors):
    """max |value| over ``tensors`` as a 0-dim device tensor (NaN if any value is NaN); no host read."""
    return torch.nn.utils.get_total_norm(list(tensors), norm_type=math.inf)


def network_extent(network):
    """max |value| over a network's parameters and floating-point buffers (what a checkpoint holds)."""
    return max_abs([*network.parameters(), *(b for b in network.buffers() if b.is_floating_point())])


def check_finite(watched, step, epoch, dist):
    """Read ``watched`` ({what: 0-dim tensor}, in the order they arose) to the host in ONE synchronisation
    and return {what: float}; ``NonFiniteLossError`` naming the first NaN/inf one and the step.

    Under DDP the ranks agree (one all-reduce of the flag) so that all of them stop together.
    """
    stacked = torch.stack([value.detach().float().reshape(()) for value in watched.values()])
    all_finite = torch.isfinite(stacked).all().to(stacked.dtype).reshape(1)
    if dist.initialized:
        torch.distributed.all_reduce(all_finite, op=torch.distributed.ReduceOp.MIN)
    flag, *values = torch.cat([all_finite, stacked]).tolist()
    host = dict(zip(watched, values, strict=True))
    if not flag:
        bad = [what for what, value in host.items() if not math.isfinite(value)]
        where = f"{bad[0]} is {host[bad[0]]}" if bad else "a value on another rank is not finite"
        raise NonFiniteLossError(f"{where} at step {step} (epoch {epoch}); training stopped, no checkpoint "
                                 f"written for this epoch")
    return host


def clip_gradients(modules, max_norm):
    """Clip the inf-norm of each module's gradients to ``max_norm`` (None: no clipping) (``modules``: {name:
    module}); returns {name: the inf-norm before clipping, a 0-dim device tensor} without reading it on the
    host (its finiteness is checked with the step's other values, ``check_finite``)."""
    norms = {}
    for name, module in modules.items():
        parameters = [parameter for parameter in module.parameters() if parameter.grad is not None]
        if not parameters:
            continue
        if max_norm is None:  # clipping off: the norm is still checked
            norms[name] = max_abs(p.grad for p in parameters)
        else:
            norms[name] = torch.nn.utils.clip_grad_norm_(parameters, max_norm=max_norm, norm_type=math.inf)
    return norms


def make_optimizers(networks, params):
    """The official Adams (betas (0.5, 0.999), weight decay 1e-4, lr ``lr_generator``): one for kp detector
    + dense motion + generator, one for the BG predictor (None without it)."""
    def adam(parameters):
        return torch.optim.Adam(parameters, lr=params["lr_generator"], betas=(0.5, 0.999), weight_decay=1e-4)

    optimizer = adam(list(networks["inpainting_network"].parameters())
                     + list(networks["dense_motion_network"].parameters())
                     + list(networks["kp_detector"].parameters()))
    bg_predictor = networks.get("bg_predictor")
    return optimizer, None if bg_predictor is None else adam(bg_predictor.parameters())


def optimisation_step(networks, total, optimizer, optimizer_bg, max_norm):
    """Backward of ``total``, the official inf-norm clipping (kp detector, dense motion, and the BG
    predictor when ``optimizer_bg`` is given: None while it is not trained), then the Adam step(s).
    Returns the clipped modules' gradient inf-norms ({name: 0-dim tensor}, not read on the host)."""
    total.backward()
    names = ("kp_detector", "dense_motion_network") + (("bg_predictor",) if optimizer_bg is not None else ())
    norms = clip_gradients({name: networks[name] for name in names}, max_norm)
    for target in (optimizer, optimizer_bg):
        if target is not None:
            target.step()
            target.zero_grad(set_to_none=True)
    return norms


def training_step(model, networks, optimizers, x, epoch, step, params, dist):
    """One training iteration, as ``train`` runs it (and the benchmark times it), with ONE host
    synchronisation.

    The full model's forward (weighted losses), backward, the official inf-norm clipping and the Adam
    steps (``optimisation_step``; the BG predictor is clipped and stepped from ``params["bg_start"]``
    on), then ``check_finite``: one read of the keypoints' extent, the losses (the values to log), the
    clipped gradients' norms and the updated networks' extent. A NaN/inf anywhere stops training there
    (``NonFiniteLossError`` naming the first one) before ``train`` writes a checkpoint, so no
    checkpoint holds non-finite weights; the weights in memory may already be (the update has run).
    model: the (possibly DDP-wrapped) ``GeneratorFullModel``; optimizers: ``make_optimizers``' pair.
    Returns ({loss name: mean as a float}, the generated outputs).
    """
    optimizer, optimizer_bg = optimizers
    losses, generated = model(x, epoch, step)
    means = {name: value.float().mean() for name, value in losses.items()}
    train_bg = optimizer_bg is not None and epoch >= params["bg_start"]
    gradient_norms = optimisation_step(networks, sum(means.values()), optimizer, optimizer_bg if train_bg else None,
                                       params["clip_grad_norm"])
    updated = ("kp_detector", "dense_motion_network", "inpainting_network") + (("bg_predictor",) if train_bg else ())
    keypoints = (generated["kp_source"]["fg_kp"], generated["kp_driving"]["fg_kp"])
    watched = {"max |keypoint| (kp_detector output)": max_abs(keypoints)}
    watched.update({f"loss '{name}'": value for name, value in means.items()})
    watched.update({f"max |gradient| of {name}": norm for name, norm in gradient_norms.items()})
    watched.update({f"max |weight| of {name} after the update": network_extent(networks[name]) for name in updated})
    host = check_finite(watched, step, epoch, dist)
    return {name: host[f"loss '{name}'"] for name in means}, generated


def unused_parameters(networks, params, epoch):
    """Whether some trainable parameter of the full model gets no gradient in a step of ``epoch``, which
    DDP must then be told (``find_unused_parameters``, an extra graph traversal per step, and a warning
    when set needlessly). Two cases: the BG predictor before ``bg_start`` (not run), and the generator's
    output layers and the dense motion's occlusion/up layers when no loss reads the prediction (the
    perceptual and structure losses both off, e.g. in ablations and tests).
    ``tests/test_train.py`` checks this against the gradients of a step."""
    weights = params["loss_weights"]
    reads_prediction = any(w != 0 for w in weights["perceptual"]) or weights["structure"] != 0
    return (networks.get("bg_predictor") is not None and epoch < params["bg_start"]) or not reads_prediction


def apply_schedule(optimizer, scheduler, lr, milestones):
    """Make a resumed optimiser and its MultiStepLR follow ``lr`` and ``milestones`` (the config's) instead of
    the checkpoint's: milestones replaced, base lr ``lr``, current lr what a run with these values has at
    the scheduler's epoch. Returns the current lr."""
    scheduler.milestones = collections.Counter(milestones)
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    current = lr * scheduler.gamma ** bisect.bisect_right(sorted(milestones), scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = current
    scheduler._last_lr = [current for _ in optimizer.param_groups]
    return current


def resume_schedule(checkpoint, section, params, lr_key, targets, dist):
    """Apply a learning rate or milestones changed since ``checkpoint`` was written (the optimiser and
    scheduler states loaded from it hold the old ones), with one line saying what changed.

    section: "train_params" or "train_avd_params"; lr_key: its lr key; targets: [(optimizer, scheduler)]
    (None entries skipped).
    """
    saved = (checkpoint.get("config") or {}).get(section) or {}
    changes = [f"{section}.{key} {saved[key]!r} -> {params[key]!r}" for key in (lr_key, "epoch_milestones")
               if key in saved and saved[key] != params[key]]
    if not changes:
        return
    current = None
    for optimizer, scheduler in targets:
        if optimizer is not None:
            current = apply_schedule(optimizer, scheduler, params[lr_key], params["epoch_milestones"])
    if dist.is_main:
        print(f"resuming with {', '.join(changes)}: applied (lr now {current:g})")


def _wrap(module, dist, device, find_unused_parameters):
    if not dist.initialized:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def train(config, networks, run_dir, device, dist=Distributed(), seed=0, checkpoint=None,
          checkpoint_path=None):
    """Train the main networks; returns the reconstruction metrics of the test split when
    ``train_params.evaluate_after_training`` is set, else None.

    The official optimisation: one Adam (betas (0.5, 0.999), weight decay 1e-4) over generator, dense
    motion and kp detector, a second one for the BG predictor stepped from bg_start, MultiStepLR x0.1 at
    epoch_milestones, inf-norm clipping at clip_grad_norm, the dropout-softmax schedule.
    networks: ``modules.build_networks(config)``; checkpoint: a loaded checkpoint dict to resume from
    (its epoch, step, optimizer and scheduler states), already checked against ``config``.
    """
    params = config["train_params"]
    for network in networks.values():
        if network is not None:
            network.to(device)
    if params["channels_last"]:
        for name in MAIN_NETWORKS:
            if networks.get(name) is not None:
                networks[name].to(memory_format=torch.channels_last)
    optimizer, optimizer_bg = make_optimizers(networks, params)
    scheduler = MultiStepLR(optimizer, params["epoch_milestones"], gamma=0.1)
    scheduler_bg = None
    if optimizer_bg is not None:
        scheduler_bg = MultiStepLR(optimizer_bg, params["epoch_milestones"], gamma=0.1)

    start_epoch, step = 0, 0
    if checkpoint is not None:
        load_network_states(networks, checkpoint, checkpoint_path, MAIN_NETWORKS)
        load_training_states(checkpoint, checkpoint_path, {"optimizer": optimizer, "scheduler": scheduler,
                                                           "optimizer_bg": optimizer_bg,
                                                           "scheduler_bg": scheduler_bg})
        start_epoch, step = int(checkpoint["epoch"]), int(checkpoint["step"])
        resume_schedule(checkpoint, "train_params", params, "lr_generator",
                        [(optimizer, scheduler), (optimizer_bg, scheduler_bg)], dist)

    dataset = training_dataset(config, params["num_repeats"])
    batch_size = per_rank_batch(params["batch_size"], dist, "train_params.batch_size")
    full_model = GeneratorFullModel(networks, params).to(device)
    model, wrapped_with = None, None
    steps_per_epoch = steps_in_epoch(make_loader(dataset, batch_size, 0, seed, 0, dist, device),
                                     params["max_steps_per_epoch"], len(dataset), batch_size)
    log = RunLog(run_dir, dist, params["num_epochs"] * steps_per_epoch, start_epoch * steps_per_epoch,
                 params["log_freq"], params["image_freq"], config["visualizer_params"],
                 resumed_at=None if checkpoint is None else step)
    try:
        for epoch in range(start_epoch, params["num_epochs"]):
            # DDP is told of unused parameters only in the epochs that have them (before bg_start, say);
            # the wrapper is rebuilt when that changes.
            find_unused = unused_parameters(networks, params, epoch)
            if model is None or find_unused != wrapped_with:
                model, wrapped_with = None, find_unused
                model = _wrap(full_model, dist, device, find_unused)
            seed_everything(epoch_seed(seed, epoch, dist.rank))
            loader = make_loader(dataset, batch_size, params["dataloader_workers"], seed, epoch, dist, device)
            full_model.train()
            optimizer.zero_grad(set_to_none=True)
            if optimizer_bg is not None:
                optimizer_bg.zero_grad(set_to_none=True)
            for index, batch in enumerate(loader):
                if index >= steps_per_epoch:
                    break
                memory_format = torch.channels_last if params["channels_last"] else torch.contiguous_format
                x = {key: batch[key].to(device, non_blocking=True).contiguous(memory_format=memory_format)
                     for key in ("source", "driving")}
                means, generated = training_step(model, networks, (optimizer, optimizer_bg), x, epoch, step,
                                                 params, dist)
                learning_rates = {"generator": optimizer.param_groups[0]["lr"]}
                if optimizer_bg is not None:
                    learning_rates["bg_predictor"] = optimizer_bg.param_groups[0]["lr"]
                log.step(step, epoch, means, learning_rates)
                log.images(step, x["source"], x["driving"], generated)
                step += 1
            scheduler.step()
            if scheduler_bg is not None:
                with warnings.catch_warnings():
                    # Faithful to the official code: the BG scheduler steps every epoch, also before
                    # bg_start when its optimizer has not stepped yet (harmless for MultiStepLR).
                    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                    scheduler_bg.step()
            if dist.is_main:
                state = state_dicts(networks, MAIN_NETWORKS)
                state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                             epoch=epoch + 1, step=step, seed=seed, config=config)
                if optimizer_bg is not None:
                    state.update(optimizer_bg=optimizer_bg.state_dict(), scheduler_bg=scheduler_bg.state_dict())
                save_epoch(run_dir, state, epoch + 1, params["checkpoint_freq"])
            dist.barrier()
    finally:
        log.close()

    if not params["evaluate_after_training"]:
        return None
    return evaluate_test_split(config, networks, run_dir, device, dist,
                               checkpoint=os.path.join(run_dir, CHECKPOINT_NAME))


def random_scale(keypoints, scale, generator=None):
    """Scale keypoints (B, N, 2), (x, y) in [-1, 1], about the origin by per-sample factors drawn
    uniformly in [1 - scale, 1 + scale], independently for x and y (TPSMM's AVD augmentation)."""
    factors = torch.rand(keypoints.shape[0], 1, 2, generator=generator) * (2 * scale) + (1 - scale)
    return keypoints * factors.to(device=keypoints.device, dtype=keypoints.dtype)


def train_avd(config, networks, run_dir, device, dist=Distributed(), seed=0, checkpoint=None,
              checkpoint_path=None):
    """Train the AVD network on frozen main networks loaded from ``checkpoint`` (required).

    Loss (MRAA/TPSMM): lambda_shift * mean |kp_driving - AVD(kp_source, random_scale(kp_driving))|.
    The main networks get no gradient and no weight update; the keypoint detector runs in train mode,
    as in the official code (see below), so its BatchNorm running statistics move. The checkpoint
    written holds the main networks as loaded, the keypoint detector with those running statistics,
    plus avd_network, optimizer_avd, scheduler_avd, avd_epoch, avd_step; resuming from such a
    checkpoint continues the AVD run.
    """
    if checkpoint is None:
        raise ValueError("--mode train_avd needs --checkpoint: a checkpoint of the trained main networks")
    params = config["train_avd_params"]
    load_network_states(networks, checkpoint, checkpoint_path, MAIN_NETWORKS)
    for name in MAIN_NETWORKS:
        if networks.get(name) is not None:
            networks[name].to(device).eval().requires_grad_(False)
    avd_network = networks["avd_network"].to(device)
    kp_detector = networks["kp_detector"]
    # Faithful to the official code: train_avd (TPSMM's, used by CPABMM) never puts the keypoint detector
    # in eval mode, so its BatchNorm layers normalise with batch statistics and update their running
    # statistics, which the checkpoint saves; its weights stay frozen (no_grad, requires_grad False).
    # Under DDP each rank updates its own copy; rank 0's is saved.
    kp_detector.train()
    optimizer = torch.optim.Adam(avd_network.parameters(), lr=params["lr"], betas=(0.5, 0.999))
    scheduler = MultiStepLR(optimizer, params["epoch_milestones"], gamma=0.1)
    start_epoch, step = 0, 0
    if "optimizer_avd" in checkpoint:
        load_network_states(networks, checkpoint, checkpoint_path, ("avd_network",))
        optimizer.load_state_dict(checkpoint["optimizer_avd"])
        scheduler.load_state_dict(checkpoint["scheduler_avd"])
        start_epoch, step = int(checkpoint["avd_epoch"]), int(checkpoint["avd_step"])
        resume_schedule(checkpoint, "train_avd_params", params, "lr", [(optimizer, scheduler)], dist)

    dataset = training_dataset(config, params["num_repeats"])
    batch_size = per_rank_batch(params["batch_size"], dist, "train_avd_params.batch_size")
    model = _wrap(avd_network, dist, device, find_unused_parameters=False)  # its forward uses every parameter
    steps_per_epoch = steps_in_epoch(make_loader(dataset, batch_size, 0, seed, 0, dist, device), None,
                                     len(dataset), batch_size)
    train_params = config["train_params"]
    log = RunLog(run_dir, dist, params["num_epochs"] * steps_per_epoch, start_epoch * steps_per_epoch,
                 train_params["log_freq"], train_params["image_freq"], config["visualizer_params"],
                 resumed_at=step if "optimizer_avd" in checkpoint else None)
    try:
        for epoch in range(start_epoch, params["num_epochs"]):
            seed_everything(epoch_seed(seed, epoch, dist.rank))
            loader = make_loader(dataset, batch_size, params["dataloader_workers"], seed, epoch, dist, device)
            avd_network.train()
            for batch in loader:
                source = batch["source"].to(device, non_blocking=True)
                driving = batch["driving"].to(device, non_blocking=True)
                with torch.no_grad():
                    kp_source = kp_detector(source)
                    kp_driving = kp_detector(driving)
                    kp_random = {"fg_kp": random_scale(kp_driving["fg_kp"], params["random_scale"])}
                reconstructed = model(kp_source, kp_random)
                error = torch.abs(kp_driving["fg_kp"] - reconstructed["fg_kp"]).mean()
                loss = params["lambda_shift"] * error
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                # One host synchronisation per step, after the update, before any checkpoint (as in training_step).
                host = check_finite({"max |keypoint| (kp_detector output)": max_abs((kp_source["fg_kp"],
                                                                                    kp_driving["fg_kp"])),
                                     "loss 'rec_kp'": loss,
                                     "max |weight| of avd_network after the update": network_extent(avd_network),
                                     "max |value| of kp_detector's running statistics": max_abs(
                                         b for b in kp_detector.buffers() if b.is_floating_point())},
                                    step, epoch, dist)
                log.step(step, epoch, {"rec_kp": host["loss 'rec_kp'"]}, {"avd": optimizer.param_groups[0]["lr"]})
                step += 1
            scheduler.step()
            if dist.is_main:
                state = {key: value for key, value in checkpoint.items()
                         if key in MAIN_NETWORKS or key in ("epoch", "step")}
                state.update(kp_detector=kp_detector.state_dict(),  # its moved running statistics
                             avd_network=avd_network.state_dict(), optimizer_avd=optimizer.state_dict(),
                             scheduler_avd=scheduler.state_dict(), avd_epoch=epoch + 1, avd_step=step,
                             seed=seed, config=config)
                save_epoch(run_dir, state, epoch + 1, params["checkpoint_freq"])
            dist.barrier()
    finally:
        log.close()
