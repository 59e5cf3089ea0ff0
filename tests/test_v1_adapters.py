"""Adapters on ChatGLM-6B (v1): peft LoRA adapters apply as their merged weights; P-tuning folders are listed with
their kind, base and prefix length (the engine applies them: test_ptuning_engine); a P-tuning folder is no model."""

import json
import shutil

import pytest
import torch

import glmapp
from glmapp.adapters import AdapterManager, list_adapters
from glmapp.demo import make_demo
from glmapp.errors import CheckpointError
from tests.conftest import _make_peft_adapter
from tests.test_v1_ptuning import make_ptuning


@pytest.fixture(scope="module")
def v1_base(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("v1-adapters") / "base", family="chatglm1")


@pytest.mark.parametrize("targets", [["query_key_value"], ["query_key_value", "dense", "dense_h_to_4h",
                                                           "dense_4h_to_h"]])
@torch.no_grad()
def test_v1_lora_changes_outputs_exactly_as_its_merged_weights(v1_base, tmp_path, targets):
    peft_model = _make_peft_adapter(v1_base, tmp_path / "lora", targets, seed=3)
    merged = peft_model.merge_and_unload()
    model, tok = glmapp.load(str(v1_base))
    ids = torch.tensor([tok.encode("你好\nLoRA on v1")])
    base = model(ids).logits
    manager = AdapterManager.of(model)
    manager.load("lora", tmp_path)
    with manager.active("lora"):
        ours = model(ids).logits
    torch.testing.assert_close(ours, merged(ids).logits, atol=1e-4, rtol=1e-4)
    assert (ours - base).abs().max() > 1e-3


def test_ptuning_folders_are_listed_with_kind_base_and_prefix_length(v1_base, tmp_path):
    root = tmp_path / "adapters"
    make_ptuning(v1_base, root / "prefix", projection=False, pre_seq_len=8)
    (root / "not-an-adapter").mkdir()
    (root / "not-an-adapter" / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
    [info] = list_adapters(root)
    assert (info.name, info.kind, info.pre_seq_len) == ("prefix", "ptuning", 8)
    assert info.base_model == "glmapp/chatglm1-demo-tiny" and info.error is None


def test_loading_a_ptuning_folder_as_the_model_says_what_it_is(v1_base, tmp_path):
    folder, _ = make_ptuning(v1_base, tmp_path / "prefix", projection=False)
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copy(v1_base / name, folder / name)
    with pytest.raises(CheckpointError, match="P-tuning v2 prefix checkpoint"):
        glmapp.load(str(folder))
