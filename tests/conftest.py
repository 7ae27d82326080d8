"""Suite-wide settings and fixtures: the compile cache stays out of the user's ~/.cache and is off by default;
the digits ViT is trained once per session (``digits_vit``).

Tests that exercise the cache turn it on explicitly with their own NNFORGE_CACHE_DIR (monkeypatch).
"""

import os
import tempfile

import pytest

from nnforge.models.real import ensure_torchvision

os.environ.setdefault("NNFORGE_CACHE", "0")
os.environ.setdefault("NNFORGE_CACHE_DIR", tempfile.mkdtemp(prefix="nnforge-test-cache-"))
# timm installs torchvision, whose PyPI (CUDA) build fails to import beside the CPU torch, and transformers
# imports it when present: give it the op schemas it checks before any test imports either
ensure_torchvision()


@pytest.fixture(scope="session")
def digits_vit(tmp_path_factory):
    """The ViT trained on the digits (tests/digits_vit.py): trained once per session, by whichever xdist worker
    needs it first; the others load its weights from the session's shared temporary directory."""
    import digits_vit as dv

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's basetemp is <session basetemp>/popen-gwN
        shared = shared.parent
    return dv.trained_once(shared / "digits-vit")


@pytest.fixture(scope="session")
def digits_diffusion(tmp_path_factory):
    """The class-conditional digits DDPM and its classifier (nnforge.models.digits_diffusion), trained once per
    session (about 2 minutes on one thread) by whichever xdist worker needs it first, loaded by the others."""
    from nnforge.models.digits_diffusion import trained_once

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    return trained_once(shared / "digits-diffusion")
