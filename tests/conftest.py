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
        # address="local": a new Ray of our own, never a cluster another test (or `ray start`) left running
        ray.init(address="local", num_cpus=2, resources={EMULATED_SLOT: 64}, include_dashboard=False,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on 127.0.0.1: ``(endpoint, make_uri)``."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import pyarrow.fs as pafs

    # This venv's moto (the dev extra's), never another one on PATH: old ones fail newer SDKs' multipart uploads.
    exe = str(Path(sys.executable).with_name("moto_server"))
    if not Path(exe).is_file():
        exe = shutil.which("moto_server") or exe
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"127.0.0.1:{port}"

    def uri(bucket: str, prefix: str, secret: str = "test-secret") -> str:
        # Credentials ride in the URI's user info, the form pyarrow.fs understands; manifests show it redacted.
        return (f"s3://test:{secret}@{bucket}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"
                f"&allow_bucket_creation=true")

    t0 = time.monotonic()
    while True:
        try:
            fs, _ = pafs.FileSystem.from_uri(uri("probe", "x"))
            fs.create_dir("probe")
            break
        except Exception:
            if time.monotonic() - t0 > 60 or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.3)
    yield endpoint, uri
    proc.terminate()
    proc.wait(timeout=30)
