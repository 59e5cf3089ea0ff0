"""The translation table: complete in both languages, every layout string routed through it, the language
chosen like the browser's, and server-made text (stats line, errors) in the reader's language."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from glmapp import errors
from glmapp.ui import i18n
from glmapp.ui.chat_handlers import setting_ranges, stats_line
from glmapp.ui.i18n import CHINESE, ENGLISH, error_text, from_accept_language, lang_of, language, t, table

UI_DIR = Path(i18n.__file__).parent
# Modules whose widgets are built with ui(key): a literal user-facing string in them fails the scan below.
LAYOUT_FILES = ["layout.py", "train_tab.py"]
TEXT_ARGUMENTS = {"label", "placeholder", "info", "value", "title", "description"}
# The browser tab's title (Blocks(title=...), the product's name) and an example adapter name (a placeholder).
NOT_TRANSLATED = {"glmapp · ChatGLM chat", "my-adapter"}
PLACEHOLDER = re.compile(r"{(\w*)}")


def test_every_key_is_in_both_languages_with_the_same_placeholders():
    en, zh = table(ENGLISH), table(CHINESE)
    assert sorted(set(en) - set(zh)) == [], "keys missing in zh-CN.json"
    assert sorted(set(zh) - set(en)) == [], "keys missing in en.json"
    for key in en:
        assert en[key].strip() and zh[key].strip(), key
        # The Chinese may leave out a detail (`{detail}` of errors) but never asks for a value English lacks.
        assert set(PLACEHOLDER.findall(zh[key])) <= set(PLACEHOLDER.findall(en[key])) | {"detail"}, key


def test_train_help_in_english_is_train_configs_own():
    from dataclasses import fields

    from glmapp.train.config import TrainConfig
    from glmapp.ui.train_tab import HYPERPARAMETERS

    helps = {f.name: f.metadata["help"] for f in fields(TrainConfig)}
    for name in HYPERPARAMETERS:  # the flags' help is the one home; en.json repeats it for the page
        assert table(ENGLISH)[f"train.hp.{name}"] == helps[name], f"update train.hp.{name} in both locales"


def test_a_missing_key_fails_loudly_and_a_missing_translation_falls_back_to_english(monkeypatch):
    with pytest.raises(KeyError):
        t("no.such.key", CHINESE)
    with pytest.raises(KeyError):
        i18n.ui("no.such.key")
    monkeypatch.delitem(table(CHINESE), "chat.send")
    assert t("chat.send", CHINESE) == "Send"


def _layout_keys() -> set[str]:
    keys = set()
    for name in LAYOUT_FILES:
        for node in ast.walk(ast.parse((UI_DIR / name).read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ui" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant):
                    keys.add(arg.value)
                elif isinstance(arg, ast.JoinedStr):  # ui(f"vote.{c}"): every key with that prefix
                    prefix = "".join(v.value for v in arg.values if isinstance(v, ast.Constant))
                    keys |= {k for k in table(ENGLISH) if k.startswith(prefix)}
    return keys


def test_layout_keys_exist_and_hold_no_placeholders():
    keys = _layout_keys()
    assert len(keys) > 50
    for key in keys:
        assert key in table(ENGLISH), key
        # Gradio's front end reads them as ICU messages: braces would be taken for arguments.
        assert "{" not in table(ENGLISH)[key] and "{" not in table(CHINESE)[key], key


def _has_words(node) -> bool:
    """A literal (or the literal parts of an f-string) with letters in it: text a person reads."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value not in NOT_TRANSLATED and bool(re.search(r"[^\W\d_]", node.value))
    if isinstance(node, ast.JoinedStr):
        return any(_has_words(v) for v in node.values)
    if isinstance(node, ast.IfExp):
        return _has_words(node.body) or _has_words(node.orelse)
    if isinstance(node, ast.BoolOp):
        return any(_has_words(v) for v in node.values)
    if isinstance(node, ast.BinOp):
        return _has_words(node.left) or _has_words(node.right)
    return False


def untranslated_strings(source: str) -> list[str]:
    """Literal text given to a Gradio widget (first argument, label, placeholder, info, value, ...) instead of
    ui(key): 'line: text' for each."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and getattr(node.func.value, "id", None) == "gr"):
            continue
        texts = [*node.args[:1], *(k.value for k in node.keywords if k.arg in TEXT_ARGUMENTS)]
        found += [f"{node.lineno}: {ast.unparse(n)[:60]}" for n in texts if _has_words(n)]
    return found


@pytest.mark.parametrize("name", LAYOUT_FILES)
def test_layout_has_no_literal_user_facing_string(name):
    assert untranslated_strings((UI_DIR / name).read_text()) == []


def test_the_scan_finds_literal_strings():
    source = ('gr.Button("Send")\ngr.Textbox(label="Prompt", placeholder=f"Type {x}")\n'
              'gr.Markdown("")\ngr.Button(ui("chat.send"))\ngr.Markdown(f"### {label}")\n'
              'gr.Markdown(ui("model.lora") + f" (`{d}/`)")\ngr.Textbox(info=why or "Frees the weights")\n')
    assert [line.split(":")[0] for line in untranslated_strings(source)] == ["1", "2", "2", "7"]


@pytest.mark.parametrize("tag, expected", [
    ("zh", CHINESE), ("zh-CN", CHINESE), ("zh-cn", CHINESE), ("zh-Hans", CHINESE), ("zh-Hans-CN", CHINESE),
    ("zh_CN", CHINESE), ("zh-SG", CHINESE), ("zh-TW", ENGLISH), ("zh-Hant", ENGLISH), ("zh-HK", ENGLISH),
    ("en-US", ENGLISH), ("fr", ENGLISH), ("", ENGLISH), (None, ENGLISH), ("zhx", ENGLISH),
])
def test_browser_language_tags_map_to_the_app_language(tag, expected):
    assert language(tag) == expected


@pytest.mark.parametrize("header, expected", [
    ("zh-CN,zh;q=0.9,en;q=0.8", CHINESE), ("en-US,en;q=0.9,zh-CN;q=0.8", ENGLISH), ("zh-Hans", CHINESE),
    ("en;q=0.5,zh;q=0.9", CHINESE), ("*", ENGLISH), ("", ENGLISH), (None, ENGLISH), ("zh-TW,zh;q=0.9", ENGLISH),
])
def test_accept_language_picks_the_most_preferred_tag(header, expected):
    assert from_accept_language(header) == expected


def test_the_page_choice_wins_over_the_header():
    def request(cookies, accept):
        return SimpleNamespace(cookies=cookies, headers={"accept-language": accept} if accept else {})

    assert lang_of(request({}, "zh-CN,zh;q=0.9")) == CHINESE
    assert lang_of(request({"glmapp-lang": "en"}, "zh-CN,zh;q=0.9")) == ENGLISH
    assert lang_of(request({"glmapp-lang": "zh-CN"}, "en-US")) == CHINESE
    assert lang_of(request({"glmapp-lang": "klingon"}, "en-US")) == ENGLISH
    assert lang_of(None) == ENGLISH


def test_every_error_code_has_a_translation():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.GlmappError)]
    codes = {c.code for c in classes}
    assert len(codes) == len(classes), "each error class has a code of its own"
    for code in codes:
        assert f"error.{code}" in table(CHINESE), code


def test_errors_are_translated_by_code_and_keep_english_for_logs():
    too_long = errors.InputTooLong("Message too long: the prompt is 900 tokens, over the limit of 200 tokens.")
    assert error_text(too_long, ENGLISH) == str(too_long)
    assert error_text(too_long, CHINESE).startswith("消息太长")
    bad = errors.AdapterError("adapters/x has no adapter_config.json")
    assert "LoRA 适配器" in error_text(bad, CHINESE) and "adapter_config.json" in error_text(bad, CHINESE)
    assert error_text(ValueError("boom"), CHINESE) == "boom"


def test_stats_line_in_both_languages():
    usage = SimpleNamespace(prompt_tokens=1200, completion_tokens=34, tokens_per_second=12.345)
    en = stats_line(usage, 8192, "1.2 GB", "length", "my-lora")
    assert en == ("adapter my-lora · 12.3 tokens/s · 1,234 / 8,192 tokens of context (34 new) · memory 1.2 GB"
                  " · stopped at the length limit")
    zh = stats_line(usage, 8192, "1.2 GB", "length", None, CHINESE)
    assert zh == "基础模型 · 12.3 tokens/s · 上下文 1,234 / 8,192 tokens（新生成 34） · 内存 1.2 GB · 已达到长度上限而停止"
    assert stats_line(None, 8192, "1 GB", None, None, CHINESE) == "基础模型 · … 等待模型 · 内存 1 GB"


def test_a_setting_out_of_range_is_named_in_the_readers_language():
    import gradio as gr

    top_k = setting_ranges(8192)["top_k"]
    with pytest.raises(gr.Error) as en:
        top_k.check(500)
    assert en.value.message == "Top k must be a whole number from 0 to 200 (got 500)."
    with pytest.raises(gr.Error) as zh:
        top_k.check(500, CHINESE)
    assert zh.value.message == "Top k必须是 0 到 200 之间的整数（收到 500）。"


def test_leaderboard_and_arena_lines_in_the_readers_language():
    from glmapp.ui.leaderboard import anonymous_stats, leaderboard

    no_votes = SimpleNamespace(games=lambda **_: [])
    assert leaderboard(no_votes, lang=CHINESE)[0].startswith("还没有计入的投票")
    assert leaderboard(no_votes)[0].startswith("No counted votes yet")
    column = {"completion_tokens": 7, "tokens_per_second": 3.21, "finish_reason": "length"}
    assert anonymous_stats(column) == "7 tokens · 3.2 tokens/s · length"
    assert anonymous_stats(column, CHINESE) == "7 tokens · 3.2 tokens/s · 达到长度上限"


def test_exported_page_chrome_in_the_readers_language():
    from glmapp.ui.export import conversation_record, render_html_page

    record = conversation_record([{"role": "user", "content": "你好"}], model={"name": "demo"})
    zh = render_html_page(record, CHINESE)
    assert '<html lang="zh-CN">' in zh and "<title>glmapp 对话</title>" in zh and "导出于" in zh and ">用户<" in zh
    assert "Noto Sans CJK SC" in zh
    en = render_html_page(record)
    assert '<html lang="en">' in en and "<title>glmapp conversation</title>" in en and "Exported" in en


def test_model_tab_text_in_the_readers_language():
    from glmapp.ui.model_handlers import capabilities_note, model_info_markdown

    from glmapp.backends.base import ModelInfo

    info = ModelInfo(name="m", family="chatglm2", parameters=6_200_000_000, dtype="float16", device="cuda:0",
                     weight_bytes=0, context_length=32768, demo=True)
    backend = SimpleNamespace(info=lambda: info, memory=lambda: "1 GB")
    english, chinese = model_info_markdown(backend), model_info_markdown(backend, CHINESE)
    assert english.endswith("Memory in use: 1 GB") and chinese.endswith("内存占用：1 GB")
    assert "| Parameters | 6,200.0 M |" in english and "| Weights in memory | unknown |" in english
    assert "| Context | 32,768 tokens |" in english and "| Demo checkpoint | yes (random weights) |" in english
    assert "| 参数量 | 6,200.0 M |" in chinese and "| 权重占用内存 | 未知 |" in chinese
    assert "| 上下文长度 | 32,768 个 token |" in chinese and "| 演示检查点 | 是（随机权重） |" in chinese
    assert "Family" not in chinese and info.as_markdown() == english.split("\n\n")[0]  # logs keep English

    def reloading():
        raise errors.ModelReloading("The model is being reloaded (see the Model tab); try again in a moment.")

    assert model_info_markdown(SimpleNamespace(info=reloading), CHINESE).startswith("模型正在重新加载")
    caps = SimpleNamespace(unavailable=lambda: {"quantization": "the server decides"})
    assert capabilities_note(caps) == "- **Quantization** unavailable: the server decides"
    assert capabilities_note(caps, CHINESE) == "- **量化**不可用：the server decides"


def test_train_messages_in_the_readers_language(tmp_path):
    from glmapp.ui.train_tab import TrainHandlers

    runner = SimpleNamespace(adapters_dir=tmp_path, stop=lambda: False, progress=lambda: None)
    handlers = TrainHandlers(runner, tmp_path, "demo")
    assert handlers.stop() == "No training job is running."
    assert handlers.stop(lang=CHINESE) == "没有正在运行的训练任务。"
    assert handlers.poll(CHINESE)[0] == "还没有训练任务。"
    assert handlers.start("", None, None, None, "bad name!", lang=CHINESE).startswith("请给适配器一个文件夹名")
