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


# LoRA adapters made by peft itself on the demo ChatGLM2 model: name -> target modules.
PEFT_TARGET_SETS = {
    "qkv": ["query_key_value"],
    "all": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "mlp": ["dense_h_to_4h", "dense_4h_to_h"],
}


def _make_peft_adapter(base_path, out, targets, seed, r=4, alpha=8):
    """An adapter made by peft itself on our model, with random non-zero A and B (saved to `out`)."""
    import torch
    from peft import LoraConfig, get_peft_model

    import glmapp

    torch.manual_seed(seed)
    model, _ = glmapp.load(str(base_path))
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                  init_lora_weights=False, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(str(out))
    return peft_model


@pytest.fixture(scope="session")
def peft_adapters_dir(tmp_path_factory, demo_v2) -> Path:
    """An adapters folder with one peft-made adapter per entry of PEFT_TARGET_SETS, for demo_v2. Read-only:
    tests that need to damage or add adapters copy from it."""
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, targets) in enumerate(PEFT_TARGET_SETS.items()):
        _make_peft_adapter(demo_v2, root / name, targets, seed=i)
    return root


@pytest.fixture(scope="session")
def adapters_copy(tmp_path_factory, peft_adapters_dir):
    """adapters_copy(name, corrupt=(), no_weights=()) -> a new folder holding the peft-made adapters plus
    copies of "qkv" under each name in `corrupt` (weight file truncated to 100 bytes) and `no_weights`
    (weight file removed)."""
    import shutil

    def make(name: str, corrupt=(), no_weights=()) -> Path:
        root = tmp_path_factory.mktemp(name)
        for child in peft_adapters_dir.iterdir():
            shutil.copytree(child, root / child.name)
        for bad in (*corrupt, *no_weights):
            shutil.copytree(peft_adapters_dir / "qkv", root / bad)
            weights = root / bad / "adapter_model.safetensors"
            if bad in corrupt:
                weights.write_bytes(weights.read_bytes()[:100])
            else:
                weights.unlink()
        return root

    return make


@pytest.fixture(scope="session")
def make_peft_adapter():
    """make_peft_adapter(base_path, out, targets, seed, r=4, alpha=8) -> the peft model (saved to `out`)."""
    return _make_peft_adapter


@pytest.fixture(scope="session")
def peft_target_sets() -> dict[str, list[str]]:
    """Adapter name -> target modules of the adapters in `peft_adapters_dir`."""
    return PEFT_TARGET_SETS
