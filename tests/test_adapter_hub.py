"""Hub adapters: which files are fetched and the size cap (the parts that run without the network; the hub
itself is not reachable from the tests)."""

import pytest

from glmapp import adapter_hub
from glmapp.errors import AdapterError

MB = 2**20


def test_only_the_adapter_files_are_fetched():
    assert adapter_hub.ADAPTER_FILES == ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                                         "README.md"]
    from huggingface_hub.utils import filter_repo_objects

    repo = ["adapter_config.json", "adapter_model.safetensors", "README.md", "pytorch_model-00001-of-00002.bin",
            "model.safetensors", "optimizer.pt", "sub/adapter_model.safetensors", "training_args.bin"]
    assert sorted(filter_repo_objects(repo, allow_patterns=adapter_hub.ADAPTER_FILES)) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_a_listing_within_the_cap_passes():
    adapter_hub.check_listing("o/a", {"adapter_config.json": 500, "adapter_model.safetensors": 30 * MB}, 64 * MB)


@pytest.mark.parametrize("sizes, why", [
    ({"adapter_config.json": 500, "adapter_model.safetensors": 65 * MB}, r"65 MB, over the 64 MB limit.*hf download o/a"),
    ({"adapter_config.json": 500, "adapter_model.bin": None}, "did not say how large"),
    ({"adapter_model.safetensors": 10}, "no adapter_config.json"),
    ({"adapter_config.json": 500}, "no adapter_model.safetensors or adapter_model.bin"),
])
def test_a_listing_over_the_cap_or_without_adapter_files_is_refused(sizes, why):
    with pytest.raises(AdapterError, match=why):
        adapter_hub.check_listing("o/a", sizes, 64 * MB)


@pytest.mark.parametrize("spec, ok", [("owner/name", True), ("THUDM/chatglm2-6b-lora.v1", True), ("name", False),
                                      ("a/b/c", False), ("../x", False), ("owner/..", False), ("/abs", False)])
def test_hub_ids(spec, ok):
    assert adapter_hub.is_hub_id(spec) is ok
