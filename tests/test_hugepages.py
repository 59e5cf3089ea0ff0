"""Big CPU tensors backed by 2 MiB pages (glmapp/hugepages.py): only whole huge pages inside a tensor's own
storage are advised, contents never change, the kernel's answer is reported, and the opt-out works."""

import sys

import pytest
import torch

from glmapp import hugepages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")


def huge_kb_at(address: int) -> int:
    """AnonHugePages (kB) of the mapping holding `address`, from /proc/self/smaps."""
    inside, total = False, 0
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1])
    return total


def test_a_big_tensor_is_advised_over_its_whole_huge_pages_and_keeps_its_values():
    t = torch.randn(5 << 20)  # 20 MiB: at least 8 whole 2 MiB pages inside
    before = t.clone()
    start = t.untyped_storage().data_ptr()
    whole = ((start + t.nbytes) // hugepages.HUGE_PAGE - -(-start // hugepages.HUGE_PAGE)) * hugepages.HUGE_PAGE
    done, refused = hugepages.back([t, t[10:]])  # the same storage twice: advised once
    assert done + refused == whole >= 8 * hugepages.HUGE_PAGE
    assert torch.equal(t, before)
    if done:  # this kernel merged them: the mapping now holds huge pages
        assert huge_kb_at(start + t.nbytes // 2) >= done // 1024


def test_small_tensors_and_other_devices_are_left_alone():
    assert hugepages.back([torch.ones(1000), torch.ones(3, 3).to("meta")]) == (0, 0)


def test_the_opt_out_turns_it_off(monkeypatch):
    monkeypatch.setenv("GLMAPP_HUGE_PAGES", "0")
    assert not hugepages.enabled()
    assert hugepages.back([torch.randn(5 << 20)]) == (0, 0)


def test_a_model_and_its_quantized_output_copy_are_covered(make_checkpoint, caplog):
    import logging

    import glmapp
    from glmapp import cpu_linear

    model, _ = glmapp.load(str(make_checkpoint("chatglm2")), dtype="bfloat16", quant="int4")
    cpu_linear.pack(model, output_bits=8)
    copy = model.transformer.output_layer.__dict__["quantized"].weight
    cache = torch.zeros(3 << 20)
    seen = []
    real = hugepages.back
    with caplog.at_level(logging.INFO, logger="glmapp.hugepages"):
        hugepages.back = lambda tensors: seen.extend(tensors) or real(tensors)
        try:
            done, refused = hugepages.back_model(model, cache)
        finally:
            hugepages.back = real
    ids = {id(t) for t in seen}
    assert id(copy) in ids and id(cache) in ids and id(model.transformer.output_layer.weight) in ids
    assert done + refused >= 4 * hugepages.HUGE_PAGE  # at least the cache's whole pages
    assert "huge pages" in caplog.text

