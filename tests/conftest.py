"""Session-wide fixtures: the tiny model is built once, Ray is started once (only by tests that ask for it)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def folder(tmp_path):
    """A storyboard folder holding ``still.png`` (the image the sample film's portrait shot uses)."""
    from PIL import Image

    Image.new("RGB", (64, 64), (30, 60, 90)).save(tmp_path / "still.png")
    return tmp_path


@pytest.fixture(scope="session")
def tiny():
    from skyray import models

    return models.build_tiny()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test run (ray.init costs seconds and gigabytes)."""
    import ray

    from skyray.executors.ray import EMULATED_SLOT

    if not ray.is_initialized():
        ray.init(num_cpus=2, resources={EMULATED_SLOT: 64}, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
