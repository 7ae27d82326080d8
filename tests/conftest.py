"""Suite-wide settings: the compile cache stays out of the user's ~/.cache and is off by default.

Tests that exercise the cache turn it on explicitly with their own NNFORGE_CACHE_DIR (monkeypatch).
"""
import os
import tempfile

os.environ.setdefault("NNFORGE_CACHE", "0")
os.environ.setdefault("NNFORGE_CACHE_DIR", tempfile.mkdtemp(prefix="nnforge-test-cache-"))
