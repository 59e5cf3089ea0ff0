"""Train tab handlers as plain functions on a real training process; the tab builds in Gradio."""

import json
import time

import gradio as gr

from glmapp.adapters import list_adapters
from glmapp.train.config import TrainConfig
from glmapp.train.job import JobRunner
from glmapp.ui.train_tab import HYPERPARAMETERS, TrainHandlers, create_train_tab

DEFAULTS = {f: getattr(TrainConfig(model="m", data=["d"], out="o"), f) for f in HYPERPARAMETERS}
DEFAULTS["gradient_checkpointing"] = "auto"  # the tab's dropdown for the field's None (on on GPU)


def values(**kw):
    return [kw.get(name, DEFAULTS[name]) for name in HYPERPARAMETERS]


def make(tmp_path, demo_v2, disabled=None):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "d.jsonl").write_text("\n".join(json.dumps({"prompt": f"问题{i}", "response": "固定的回答"})
                                                for i in range(6)), encoding="utf-8")
    return TrainHandlers(JobRunner(tmp_path / "adapters"), data_dir, str(demo_v2), disabled)


def test_preview_renders_rows_with_the_template_and_reports(tmp_path, demo_v2):
    h = make(tmp_path, demo_v2)
    assert h.data_choices() == ["d.jsonl"]
    table, report = h.preview("", "d.jsonl", None, 1024, "truncate")
    rows = table.values.tolist()
    assert len(rows) == 5 and rows[0][0].startswith("[Round 1]") and "问：问题0" in rows[0][0]
    assert rows[0][1].strip() == "固定的回答" and list(table.columns)[1] == "trained reply"
    assert "Detected format: d.jsonl: prompt (6 examples)" in report
    zh_table, zh_report = h.preview("", "d.jsonl", None, 1024, "truncate", lang="zh-CN")
    assert list(zh_table.columns) == ["提示（按模板渲染）", "训练的回答"] and zh_table.values.tolist() == rows
    assert "检测到的格式：d.jsonl：prompt（6 个样本）" in zh_report and "Detected" not in zh_report
    (tmp_path / "outside.jsonl").write_text(json.dumps({"prompt": "q", "response": "a"}))
    _, bad = h.preview("", "../outside.jsonl", None, 1024, "truncate")  # exists, but outside the data folder
    assert bad.startswith("**Cannot use this data:**") and "No data file named" in bad


def test_start_poll_finish_and_refusals(tmp_path, demo_v2):
    h = make(tmp_path, demo_v2)
    assert "folder name" in h.start("", "d.jsonl", None, None, "../x", *values())
    started = h.start("", "d.jsonl", None, None, "tab", *values(max_steps=3, batch_size=2, grad_accum=1))
    assert started.startswith("Started training 'tab'. Needs about ") and "of RAM is available" in started
    assert "A training job is running (tab)" in h.start("", "d.jsonl", None, None, "tab2", *values())
    deadline = time.monotonic() + 300
    while h.runner.job.running():
        assert h.finished_adapter() is None
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert h.finished_adapter() == "tab" and h.compare_prompt("tab") == "问题0"  # "Compare with base" fills these
    text, bar, points, log = h.poll()
    assert text.startswith("**tab**: finished — step 3/3") and [p[0] for p in points] == [1, 2, 3]
    assert bar == '<progress value="3" max="3"></progress>'
    assert "Adapter written to …/tab" in log and str(tmp_path) not in log  # no server path in the page
    assert [a.name for a in list_adapters(tmp_path / "adapters") if a.error is None] == ["tab"]
    assert "already exists" in h.start("", "d.jsonl", None, None, "tab", *values())
    assert h.stop() == "No training job is running."


def test_disabled_tab_refuses_to_start_and_builds(tmp_path, demo_v2):
    h = make(tmp_path, demo_v2, disabled="a public link without --auth; pass --allow-train to override")
    assert h.start("", "d.jsonl", None, None, "x", *values()).startswith("Training is off: a public link")
    assert not (tmp_path / "adapters").exists()
    with gr.Blocks():
        w = create_train_tab(h)
    assert w["start"].interactive is False


def test_app_has_a_train_tab_that_a_public_link_without_login_turns_off(tmp_path, demo_v2):
    from glmapp.backends import LocalBackend
    from glmapp.ui import AppConfig
    from glmapp.ui.layout import build_ui

    backend = LocalBackend.load(str(demo_v2), adapters_dir=str(tmp_path / "adapters"))
    try:
        for config, off in [(AppConfig(share=True, data_dir=str(tmp_path)), True),
                            (AppConfig(share=True, auth=["u:p"], data_dir=str(tmp_path)), False)]:
            demo = build_ui(backend, config)
            tabs = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
            assert "tab-train" in tabs
            starts = [b for b in demo.blocks.values() if isinstance(b, gr.Button) and b.elem_id == "train-start"]
            assert len(starts) == 1 and starts[0].interactive is (not off)
            demo.close()
    finally:
        backend.close()


def test_presets_are_the_files_glmapp_train_reads_and_load_back_into_the_tab(tmp_path, demo_v2):
    import argparse

    from glmapp.train.config import add_arguments, from_args

    h = make(tmp_path, demo_v2)
    (h.data_dir / "e.jsonl").write_text(json.dumps({"prompt": "评估", "response": "固定的回答"}), encoding="utf-8")
    chosen = values(rank=4, lr=1e-3, targets="query_key_value,dense", eval_steps=5, early_stopping_patience=3,
                    save_steps=10, gradient_checkpointing="on")
    status = h.save_preset("fast", "", "d.jsonl", "e.jsonl", "mine", *chosen)
    assert status.startswith("Saved preset 'fast'") and h.preset_choices() == ["fast"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = from_args(parser.parse_args(["--config", str(h.presets_dir / "fast.yaml"), "--rank", "2"]))
    assert (config.model, config.data, config.eval, config.out) == (
        str(demo_v2), [str(h.data_dir / "d.jsonl")], str(h.data_dir / "e.jsonl"), str(tmp_path / "adapters" / "mine"))
    assert (config.rank, config.lr, config.targets, config.early_stopping_patience, config.gradient_checkpointing) == \
        (2, 1e-3, "query_key_value,dense", 3, True)

    loaded = h.load_preset("fast")
    assert loaded[:4] == ("", "d.jsonl", "e.jsonl", "mine") and loaded[-1] == "Loaded preset 'fast'."
    assert dict(zip(HYPERPARAMETERS, loaded[4:-1])) == dict(zip(HYPERPARAMETERS, chosen))

    (h.presets_dir / "bad.yaml").write_text("rank: 4\nbatch: 2\n", encoding="utf-8")
    bad = h.load_preset("bad")
    assert bad[-1].startswith("Cannot load preset 'bad': bad.yaml: unknown settings batch")
    assert all(v is gr.skip() or isinstance(v, type(gr.skip())) for v in bad[:-1])
    assert h.load_preset("../fast")[-1] == "Choose a saved preset."
    assert h.save_preset("../x", "", "d.jsonl", None, "", *chosen).startswith("Give the preset a name")
    assert h.save_preset("p", "", "d.jsonl", None, "", *values(batch_size=None)) == \
        "Not saved: batch_size is empty: give a whole number."
    # Early stopping needs an eval file: the setting names what is missing.
    assert "needs an evaluation set" in h.save_preset("p", "", "d.jsonl", None, "",
                                                      *values(early_stopping_patience=3))
