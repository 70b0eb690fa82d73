"""Which frame sizes the networks take: the rule, checked at start-up from the config.

An input of H x W goes through
- the generator's encoder: ``num_down_blocks`` DownBlocks, each a 2x2 average pooling (floor); the
  decoder upsamples by 2 and concatenates the warped skip features of the same level, so H and W must
  be divisible by 2^num_down_blocks;
- the dense motion network: the anti-aliased downscale to (floor(H * scale_factor), floor(W *
  scale_factor)) (as ``F.interpolate(scale_factor=...)`` rounds; no downscale when scale_factor is 1),
  then the hourglass, whose decoder concatenates each upsampled level with the encoder level of the same
  size, so that downscaled size must be divisible by 2^num_blocks.
Nothing else constrains the size: the keypoint detector and the BG predictor (ResNet-18, global
pooling) take any size, the occlusion masks and the flow are resized to each generator level, and the
motion models work at any size. The rule applies to H and W independently. ``tests/modules/test_sizes.py``
checks it against the networks on tiny configs.
"""
import math

# Sizes searched for the "sizes that work" hint.
_SEARCH_LIMIT = 4096


class FrameSizeError(ValueError):
    """A frame size the networks cannot take; one line naming the size, the rule and sizes that work."""


def motion_size(length, scale_factor):
    """The dense motion's length for an input length (the anti-aliased downscale's rounding)."""
    return length if scale_factor == 1 else math.floor(float(length * scale_factor))


def length_fits(length, num_down_blocks, num_blocks, scale_factor):
    """Whether one side of ``length`` pixels fits the generator and the dense motion (module docstring)."""
    small = motion_size(length, scale_factor)
    return length % 2 ** num_down_blocks == 0 and small >= 1 and small % 2 ** num_blocks == 0


def working_lengths(num_down_blocks, num_blocks, scale_factor, limit=_SEARCH_LIMIT):
    """Every side length in [1, limit] that fits."""
    return [n for n in range(1, limit + 1) if length_fits(n, num_down_blocks, num_blocks, scale_factor)]


def describe_working_lengths(num_down_blocks, num_blocks, scale_factor, near=None):
    """Which side lengths fit, in words: "multiples of 128 (128, 256, 384, ...)" when they are exactly the
    multiples of the smallest one, else the first few; with ``near``, the closest ones below and above."""
    lengths = working_lengths(num_down_blocks, num_blocks, scale_factor)
    if not lengths:
        return f"no size up to {_SEARCH_LIMIT} fits"
    first = lengths[0]
    if lengths == list(range(first, _SEARCH_LIMIT + 1, first)):
        text = f"multiples of {first} ({first}, {2 * first}, {3 * first}, ...)"
    else:
        text = ", ".join(str(n) for n in lengths[:6]) + ", ..."
    if near is not None:
        below = [n for n in lengths if n < near]
        above = [n for n in lengths if n > near]
        closest = ([below[-1]] if below else []) + ([above[0]] if above else [])
        text += f"; nearest to {near}: {' or '.join(str(n) for n in closest)}"
    return text


def size_problem(size, num_down_blocks, num_blocks, scale_factor):
    """None when ``size`` = (H, W) fits the networks, else why not (one line, without the size's origin)."""
    height, width = (int(n) for n in size)
    if all(length_fits(n, num_down_blocks, num_blocks, scale_factor) for n in (height, width)):
        return None
    small = f"{motion_size(height, scale_factor)}x{motion_size(width, scale_factor)}"
    bad = next(n for n in (height, width) if not length_fits(n, num_down_blocks, num_blocks, scale_factor))
    return (f"{height}x{width} does not fit the networks: the generator (num_down_blocks {num_down_blocks}) needs H "
            f"and W divisible by {2 ** num_down_blocks}, the dense motion (scale_factor {scale_factor:g} -> {small}, "
            f"num_blocks {num_blocks}) needs its size divisible by {2 ** num_blocks}; sizes that work: "
            f"{describe_working_lengths(num_down_blocks, num_blocks, scale_factor, near=bad)}")


def config_size_problem(model_params, size):
    """:func:`size_problem` for a validated config's ``model_params``."""
    dense_motion = model_params["dense_motion_params"]
    return size_problem(size, model_params["generator_params"]["num_down_blocks"], dense_motion["num_blocks"],
                        dense_motion["scale_factor"])


def check_frame_size(model_params, size, origin):
    """``FrameSizeError`` "<origin>: <problem>" when ``size`` (H, W) does not fit the config's networks.

    origin: where the size comes from, e.g. "dataset_params.frame_shape" or "--img_shape".
    """
    problem = config_size_problem(model_params, size)
    if problem is not None:
        raise FrameSizeError(f"{origin}: frame size {problem}")
