"""Shared fixtures: a tiny random-weight model, eager on it, and private cache directories for exports."""

import os

import pytest

# Tests never reach a model hub; transformers and huggingface_hub read this at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from model.gpt import GPT, build_model, get_config  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def bench_cache_dir(tmp_path_factory):
    """Exports and compiled models go to a temporary directory, never the user's cache."""
    path = tmp_path_factory.mktemp("bench-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_model() -> GPT:
    """The ``tiny`` preset with seed-0 weights, in eval mode. Shared: do not modify it."""
    return build_model(get_config("tiny"), seed=0)


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    """An empty export cache for this test alone."""
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def eager(tiny_model):
    """The reference: eager fp32 loaded with ``tiny_model``, closed after the module."""
    from backends.eager import EagerBackend

    with EagerBackend() as backend:
        backend.load(tiny_model)
        yield backend
