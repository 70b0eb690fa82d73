"""Optional dependencies stay optional: every module of the project imports, and a tiny model animates and
takes a training step, in a process where segment_anything and imageio_ffmpeg cannot be imported (the
GPU benchmark box has neither); each is imported only where the SAM loss is built or a video is read
or written."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {"tests", ".git", "venv", ".venv", "data", "runs", "weights", "__pycache__", ".ci"}


def project_modules():
    """Dotted names of every .py module of the repository outside tests/."""
    names = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                relative = os.path.relpath(os.path.join(folder, name), ROOT)[:-3]
                names.append(relative.replace(os.sep, ".").removesuffix(".__init__"))
    return names


SCRIPT = """
import sys
sys.modules["segment_anything"] = None   # `import segment_anything` now raises ImportError
sys.modules["imageio_ffmpeg"] = None
import importlib
for name in {names!r}:
    importlib.import_module(name)

import torch
from configuration import load_config
from modules import build_networks
from full_model import GeneratorFullModel
from train import Distributed, make_optimizers, training_step
config = load_config("config/synthetic-64.yaml", overrides=[
    "model_params.common_params.num_cpab=2", "model_params.generator_params.block_expansion=8",
    "model_params.generator_params.max_features=16", "model_params.dense_motion_params.block_expansion=8",
    "model_params.dense_motion_params.max_features=16", "train_params.scales=[1]",
    "train_params.loss_weights.perceptual=[0, 0, 0, 0, 0]"])
networks = build_networks(config)
tp = config["train_params"]
model = GeneratorFullModel(networks, tp)
x = {{"source": torch.rand(2, 3, 32, 32), "driving": torch.rand(2, 3, 32, 32)}}
means, generated = training_step(model, networks, make_optimizers(networks, tp), x, tp["bg_start"], 0, tp,
                                 Distributed())
assert generated["prediction"].shape == (2, 3, 32, 32) and means
for name in ("segment_anything", "imageio_ffmpeg"):
    assert sys.modules[name] is None, name
print("imported", len({names!r}), "modules")
"""


def test_every_module_imports_and_trains_without_segment_anything_and_imageio_ffmpeg():
    names = project_modules()
    assert {"run", "demo", "animation", "checkpoint", "modules.motion", "bench.speed", "cpab"} <= set(names)
    result = subprocess.run([sys.executable, "-c", SCRIPT.format(names=names)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"imported {len(names)} modules" in result.stdout
