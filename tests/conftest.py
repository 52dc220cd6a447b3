import os

import pytest
import torch

from lab.util import data_dir


@pytest.fixture
def data_root():
    """The shared data directory; skips where it is absent, but fails where LAB_REQUIRE_DATA=1 (CI)."""
    root = data_dir()
    if not (root / "glue").is_dir() or not (root / "wikitext-2").is_dir():
        message = f"data directory {root} lacks glue/ and wikitext-2/; set LAB_DATA_DIR to the data folder"
        if os.environ.get("LAB_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session caches tokenised corpora in its own temp folder. The test process keeps glibc's
    allocator as it is: a CLI run in-process would otherwise change how every later test allocates
    (lab.util.keep_freed_memory; tests/test_training.py runs it in a child of its own)."""
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lab-cache"))
    monkeypatch.setenv("LAB_KEEP_FREED_MEMORY", "0")
    torch.manual_seed(0)
