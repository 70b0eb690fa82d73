"""The extractors' networks have the state-dict layouts of the published weight files.

The figures were read from the authors' own model code, instantiated with random weights (modern
torch adds ``num_batches_tracked`` to every BatchNorm; files saved before torch 0.4.1 lack it and
still load strictly, see test_legacy_state_dict_without_batch_counters_loads):
- FAN-4: face-alignment commit 3750f83 (v1.0.0, pinned by pose-evaluation), face_alignment/models.py, FAN(4)
- S3FD: same commit, face_alignment/detection/sfd/net_s3fd.py, s3fd()
- OpenFace: thnkim/OpenFacePytorch commit d002218, loadOpenFace.py, netOpenFace
- rtpose: AliaksandrSiarohin/pytorch_Realtime_Multi-Person_Pose_Estimation commit 257d8b4,
  network/rtpose_vgg.py, get_model('vgg19')
- re-ID: layumi/Person_reID_baseline_pytorch commit 2a5a656, model.py, ft_net(751)
Each row: number of entries, parameters (without the batch counters), the first 16 hex digits of the
SHA-256 of the sorted lines "<key> <shape tuple>", and entries spelled out.
"""
import hashlib
import math

import pytest
import torch

from evaluation.extractors.body_identity import FtNet
from evaluation.extractors.body_keypoints import RTPose
from evaluation.extractors.face_identity import OpenFace
from evaluation.extractors.face_landmarks import FAN, S3FD
from evaluation.weights import MissingWeightsError, load_published

PUBLISHED = {
    "fan4": (lambda: FAN(4), 1129, 23874320, "0d87cf689f0e7da5",
             {"conv1.weight": (64, 3, 7, 7), "m3.b2_plus_1.conv1.weight": (128, 256, 3, 3),
              "conv4.downsample.2.weight": (256, 128, 1, 1), "al2.weight": (256, 68, 1, 1),
              "l3.weight": (68, 256, 1, 1)}),
    "s3fd": (S3FD, 65, 22459110, "90505009c0c337d9",
             {"conv3_3_norm.weight": (256,), "conv3_3_norm_mbox_conf.weight": (4, 256, 3, 3),
              "fc6.weight": (1024, 512, 3, 3), "conv7_2_mbox_loc.weight": (4, 256, 3, 3)}),
    "openface": (OpenFace, 261, 3743280, "4704d02e3c5d9103",
                 {"layer1.weight": (64, 3, 7, 7), "layer14.seq_list.0.4_conv.weight": (128, 96, 3, 3),
                  "layer14.seq_list.2.2_conv.weight": (32, 192, 1, 1), "layer16.seq_list.2.1_pool.weight": None,
                  "layer21.seq_list.1.2_conv.weight": (96, 736, 1, 1),
                  "layer21.seq_list.2.1_conv.weight": (256, 736, 1, 1), "layer25.weight": (128, 736)}),
    "rtpose": (RTPose, 184, 52311446, "f59cf6bad37079ef",
               {"model0.0.weight": (64, 3, 3, 3), "model0.25.weight": (128, 256, 3, 3),
                "model1_1.8.weight": (38, 512, 1, 1), "model2_1.0.weight": (128, 185, 7, 7),
                "model6_2.12.weight": (19, 128, 1, 1)}),
    "reid": (FtNet, 327, 24997551, "58b991d802ed7fd9",
             {"model.conv1.weight": (64, 3, 7, 7), "model.layer4.2.conv3.weight": (2048, 512, 1, 1),
              "model.fc.0.weight": (512, 2048), "model.fc.1.running_var": (512,),
              "classifier.0.weight": (751, 512)}),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_state_dict_layout_is_the_published_one(name):
    build, entries, parameters, digest, spelled = PUBLISHED[name]
    state = build().state_dict()
    lines = sorted(f"{key} {tuple(value.shape)}" for key, value in state.items())
    assert len(state) == entries
    assert sum(math.prod(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")) == parameters
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16] == digest
    for key, shape in spelled.items():
        if shape is None:
            assert key not in state, key
        else:
            assert tuple(state[key].shape) == shape, key


def _roundtrip(tmp_path, module, transform):
    source = OpenFace()
    for value in source.state_dict().values():
        if value.dtype.is_floating_point:
            value.uniform_(-1, 1)
    path = str(tmp_path / "weights.pth")
    torch.save(transform(source.state_dict()), path)
    load_published(module, path, "eval_params.weights.openface")
    return source


@pytest.mark.parametrize("wrap", ["plain", "module_prefix", "checkpoint_dict"])
def test_published_files_load_strictly(tmp_path, wrap):
    transforms = {"plain": lambda s: s,
                  "module_prefix": lambda s: {"module." + k: v for k, v in s.items()},
                  "checkpoint_dict": lambda s: {"state_dict": s, "epoch": 3}}
    target = OpenFace()
    source = _roundtrip(tmp_path, target, transforms[wrap])
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_legacy_state_dict_without_batch_counters_loads(tmp_path):
    target = OpenFace()
    _roundtrip(tmp_path, target, lambda s: {k: v for k, v in s.items() if not k.endswith("num_batches_tracked")})


def test_wrong_layout_is_a_one_line_error_naming_the_file(tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"layer1.weight": torch.zeros(64, 3, 7, 7), "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(MissingWeightsError) as info:
        load_published(OpenFace(), path, "eval_params.weights.openface")
    message = str(info.value)
    assert "\n" not in message and path in message and "missing keys" in message and "extra.weight" in message


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_archive_loads_its_parameters(tmp_path):
    """face-alignment 1.3-1.4 ship FAN as a TorchScript archive (2DFAN4-cd938726ad.zip)."""
    source = OpenFace().eval()
    traced = torch.jit.trace(source, torch.rand(1, 3, 96, 96))
    path = str(tmp_path / "2DFAN4-like.zip")
    traced.save(path)
    target = load_published(OpenFace(), path, "eval_params.weights.openface")
    assert all(torch.equal(target.state_dict()[key], value) for key, value in source.state_dict().items())
