"""Training settings: flags, YAML files, per-layer learning rates, the loss and its L2 term, evaluation."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from glmapp.cli import build_parser
from glmapp.train.config import ConfigError, TrainConfig, from_args, write_yaml
from glmapp.train.run import CausalLoss, add_lora, load_model, parameter_groups, train


def parse(argv):
    return from_args(build_parser().parse_args(["train", *argv]))


def test_help_shows_every_default():
    out = subprocess.run([sys.executable, "-m", "glmapp", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    flat = " ".join(out.split())
    for flag, default in [("--rank", "8"), ("--alpha", "32"), ("--dropout", "0.1"), ("--targets", "query_key_value"),
                          ("--epochs", "3"), ("--lr", "0.0002"), ("--batch-size", "4"), ("--grad-accum", "8"),
                          ("--max-length", "1024"), ("--quant", "none"), ("--lora-l2", "0.0")]:
        assert flag in flat and f"(default: {default})" in flat.split(flag, 2)[-1][:400], flag


def test_yaml_config_gives_every_setting_and_flags_win(tmp_path):
    config = TrainConfig(model="m", data=["a.jsonl"], out="adapters/x", rank=16, lr=1e-3, layer_lr="0-1:1e-5")
    write_yaml(config, tmp_path / "c.yaml")
    assert parse(["--config", str(tmp_path / "c.yaml")]) == config
    mixed = parse(["--config", str(tmp_path / "c.yaml"), "--rank", "4", "--data", "b.jsonl", "c.jsonl"])
    assert (mixed.rank, mixed.lr, mixed.data) == (4, 1e-3, ["b.jsonl", "c.jsonl"])
    assert parse(["--model", "m", "--data", "a.jsonl", "--out", "o"]).alpha == 32


@pytest.mark.parametrize("text, message", [("rnak: 4\nmodel: m\n", "unknown settings rnak"),
                                           ("- a\n- b\n", "expected a mapping"),
                                           ("model: [unclosed\n", "not valid YAML")])
def test_bad_yaml_says_what_is_wrong(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse(["--config", str(tmp_path / "c.yaml")])


@pytest.mark.parametrize("kwargs, message", [
    (dict(targets="qkv"), "Unknown --targets qkv"), (dict(layer_lr="0-11=1e-5"), "FIRST-LAST:LR"),
    (dict(layer_lr="5-2:1e-4"), "FIRST-LAST:LR"), (dict(rank=0), "--rank"),
    (dict(early_stopping_patience=3), "needs an evaluation set")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(model="m", data=["d"], out="o", **kwargs)


def test_missing_required_setting(tmp_path):
    with pytest.raises(ConfigError, match="Missing --model, --out"):
        parse(["--data", "a.jsonl"])


def test_targets_all_and_layer_learning_rates_make_optimizer_groups(demo_v2):
    config = TrainConfig(model=str(demo_v2), data=["d"], out="o", targets="all", layer_lr="0-0:1e-5")
    assert config.target_modules() == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    model, _ = load_model(config)
    peft_model = add_lora(model, config)
    groups = {g["lr"]: g["params"] for g in parameter_groups(peft_model, config)}
    names = {id(p): n for n, p in peft_model.named_parameters()}
    assert set(groups) == {1e-5, 2e-4}
    assert all(".layers.0." in names[id(p)] for p in groups[1e-5]) and len(groups[1e-5]) == 8
    assert all(".layers.1." in names[id(p)] for p in groups[2e-4]) and len(groups[2e-4]) == 8


def test_lora_l2_adds_the_penalty_once_per_step(demo_v2):
    config = TrainConfig(model=str(demo_v2), data=["d"], out="o", dropout=0.0)
    model, _ = load_model(config)
    peft_model = add_lora(model, config)
    ids = torch.randint(10, 1000, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    out = peft_model(input_ids=ids)
    plain = CausalLoss(peft_model, 0.0)(out, labels)
    squares = sum(p.pow(2).sum() for n, p in peft_model.named_parameters() if p.requires_grad)
    # two micro-batches of one row each, counted over the step's 14 label tokens: the shares add up to one
    halves = [CausalLoss(peft_model, 0.5)(type(out)(logits=out.logits[i:i + 1]), labels[i:i + 1],
                                          num_items_in_batch=torch.tensor(14)) for i in range(2)]
    torch.testing.assert_close(sum(halves), plain + 0.5 * squares)


def _data(tmp_path, n=8):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"question {i} 问题", "response": "answer 回答" * (1 + 3 * i)})
                              for i in range(n)))
    return path


def test_micro_batches_and_accumulation_train_the_same_adapter(tmp_path, demo_v2):
    data = _data(tmp_path)
    common = dict(model=str(demo_v2), data=[str(data)], max_steps=2, dropout=0.0, lr=1e-2, save_steps=100)
    train(TrainConfig(out=str(tmp_path / "one"), batch_size=4, grad_accum=1, **common))
    train(TrainConfig(out=str(tmp_path / "acc"), batch_size=1, grad_accum=4, **common))
    a, b = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("one", "acc"))
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_eval_set_logs_eval_loss_into_log_and_card(tmp_path, demo_v2):
    data = _data(tmp_path)
    out = tmp_path / "ev"
    train(TrainConfig(model=str(demo_v2), data=[str(data)], eval=str(data), out=str(out), max_steps=4, eval_steps=2,
                      save_steps=2, early_stopping_patience=3, batch_size=4, grad_accum=1))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["eval_loss"] is not None] == [2, 4]
    assert "final eval loss: " in (out / "README.md").read_text()
    assert "final eval loss: None" not in (out / "README.md").read_text()
