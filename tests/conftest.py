"""Shared fixtures for the glmapp test suite."""

import os
import tempfile
from pathlib import Path

# Tests never reach the network and never see the user's Hugging Face cache: set before any import
# of huggingface_hub (glmapp imports transformers, which imports it).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="glmapp-test-hf-")
os.environ.setdefault("GLMAPP_CACHE", tempfile.mkdtemp(prefix="glmapp-test-cache-"))

import pytest  # noqa: E402

from glmapp.tokenizer import train_demo_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT / "assets" / "corpus"


@pytest.fixture(scope="session")
def demo_sp_model(tmp_path_factory) -> Path:
    """Path of a demo `tokenizer.model` trained once from assets/corpus (its folder works for from_pretrained)."""
    model_file = tmp_path_factory.mktemp("demo_tokenizer") / "tokenizer.model"
    train_demo_tokenizer(CORPUS_DIR, model_file)
    return model_file


def _demo(tmp_path_factory, family: str, fmt: str = "safetensors-sharded", size: str = "tiny") -> Path:
    from glmapp.demo import make_demo

    return make_demo(tmp_path_factory.mktemp(f"{family}-{fmt}-{size}"), family=family, size=size, fmt=fmt)


@pytest.fixture(scope="session")
def demo_v2(tmp_path_factory) -> Path:
    """Tiny ChatGLM2 checkpoint in the official layout (safetensors shards + index)."""
    return _demo(tmp_path_factory, "chatglm2")


@pytest.fixture(scope="session")
def demo_v3(tmp_path_factory) -> Path:
    """Tiny ChatGLM3 checkpoint in the official layout."""
    return _demo(tmp_path_factory, "chatglm3")


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """Factory for further checkpoints: make_checkpoint(family, fmt, size)."""
    return lambda family="chatglm2", fmt="safetensors-sharded", size="tiny": _demo(tmp_path_factory, family, fmt, size)


@pytest.fixture(scope="session")
def loaded_v2(demo_v2):
    import glmapp

    return glmapp.load(str(demo_v2))


@pytest.fixture(scope="session")
def loaded_v3(demo_v3):
    import glmapp

    return glmapp.load(str(demo_v3))
