"""Extractors of the protocol metrics and the builder that picks them per domain.

Domain ``face`` (VoxCeleb): AKD from :class:`FaceLandmarkExtractor` (FAN-4 + S3FD), AED from
:class:`FaceIdentityExtractor` (OpenFace). Domain ``body`` (TaiChiHD, TED): AKD and MKR from
:class:`BodyKeypointExtractor` (rtpose), AED from :class:`BodyIdentityExtractor` (re-ID ft_net).
A new extractor subclasses :class:`KeypointExtractor` or :class:`EmbeddingExtractor` and is added to
``EXTRACTORS``.
"""
from evaluation.extractors.base import EmbeddingExtractor, KeypointExtractor, to_uint8
from evaluation.extractors.body_identity import BodyIdentityExtractor
from evaluation.extractors.body_keypoints import BodyKeypointExtractor
from evaluation.extractors.face_identity import FaceIdentityExtractor
from evaluation.extractors.face_landmarks import FaceLandmarkExtractor

# (domain, role) -> (class, weight keys in constructor order)
EXTRACTORS = {
    ("face", "keypoints"): (FaceLandmarkExtractor, ("fan", "s3fd")),
    ("face", "identity"): (FaceIdentityExtractor, ("openface",)),
    ("body", "keypoints"): (BodyKeypointExtractor, ("rtpose",)),
    ("body", "identity"): (BodyIdentityExtractor, ("reid",)),
}

# metric -> the extractor role it needs (None: none)
METRIC_ROLES = {"l1": None, "akd": "keypoints", "mkr": "keypoints", "aed": "identity"}


def weight_keys(domain, metrics):
    """The weight keys the metrics need in ``domain``, in a stable order."""
    keys = []
    for role in ("keypoints", "identity"):
        if any(METRIC_ROLES[metric] == role for metric in metrics):
            keys += list(EXTRACTORS[(domain, role)][1])
    return keys


def build_extractors(domain, metrics, weight_files, device="cpu", batch_size=16):
    """{'keypoints': KeypointExtractor, 'identity': EmbeddingExtractor} for what ``metrics`` need.

    ``weight_files``: {key: resolved path or None (random weights)} for :func:`weight_keys`.
    """
    extractors = {}
    for role in ("keypoints", "identity"):
        if any(METRIC_ROLES[metric] == role for metric in metrics):
            cls, keys = EXTRACTORS[(domain, role)]
            paths = [weight_files.get(key) for key in keys]
            extractors[role] = cls(*paths, device=device, batch_size=batch_size)
    return extractors


__all__ = ["BodyIdentityExtractor", "BodyKeypointExtractor", "EXTRACTORS", "EmbeddingExtractor",
           "FaceIdentityExtractor", "FaceLandmarkExtractor", "KeypointExtractor", "METRIC_ROLES",
           "build_extractors", "to_uint8", "weight_keys"]
