"""Shared fixtures of the test suite: a tiny shapes dataset, generated once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from minicenternet.data.shapes import ShapesConfig, generate_shapes

TINY_SHAPES = ShapesConfig(num_train=8, num_val=4, num_test=4, image_size=64)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A COCO-layout shapes dataset of 8 train, 4 val and 4 test 64x64 images (read-only for tests)."""
    root = tmp_path_factory.mktemp("tiny_shapes")
    return generate_shapes(root, TINY_SHAPES, workers=0)
