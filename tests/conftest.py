"""Shared pytest fixtures: tiny checkpoints (built once per session), test images and a video."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

import mlx_compact  # noqa: F401  (import before mlx: it preloads OpenBLAS)

sys.path.insert(0, os.path.dirname(__file__))

from tiny_checkpoints import make_checkpoint  # noqa: E402

SEEDS = (0, 1, 2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory `tiny_checkpoint(arch, **variant) -> Path`, cached per (arch, variant) for the session.

    variant: layout=, dialect=, seed=, tie_word_embeddings= as in `tiny_checkpoints.make_checkpoint`.
    """
    cache = {}

    def build(arch: str, **variant):
        key = (arch, tuple(sorted(variant.items())))
        if key not in cache:
            name = "-".join([arch] + [f"{k}={v}" for k, v in key[1]])
            cache[key] = make_checkpoint(arch, tmp_path_factory.mktemp(name), **variant)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def ckpt(tiny_checkpoint):
    """Short alias of `tiny_checkpoint`."""
    return tiny_checkpoint


def _noise_image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth gradient plus noise, so resizing is not trivial
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)  # [h, w, 3]
    img = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)  # [h, w, 3]
    return Image.fromarray(img, "RGB")


@pytest.fixture(scope="session")
def image_wide():
    """A non-square RGB image, 90 wide x 60 high."""
    return _noise_image(60, 90, seed=1)


@pytest.fixture(scope="session")
def image_tall():
    """A non-square RGB image, 56 wide x 84 high."""
    return _noise_image(84, 56, seed=2)


@pytest.fixture(scope="session")
def images(image_wide, image_tall):
    """Two images of different sizes."""
    return [image_wide, image_tall]


@pytest.fixture(scope="session")
def video_frames():
    """A 4-frame video (list of PIL RGB frames, 64 wide x 48 high) with motion between frames."""
    return [_noise_image(48, 64, seed=10 + i).rotate(5 * i) for i in range(4)]


@pytest.fixture(scope="session", params=SEEDS)
def seed(request):
    return request.param
