"""The Train tab: data preview and validation report, hyperparameters, Start/Stop, live progress and loss plot.

Notable choices:
- `TrainHandlers` are plain functions over a `JobRunner` (unit-tested without a browser); `create_train_tab`
  only builds widgets and wires them. Training runs as `python -m glmapp train --config ...`, never in the
  server process.
- Data files are confined to the data folder (a name inside it, or an upload Gradio placed in its temp dir);
  the adapter name must be a plain folder name inside the adapters folder.
- The preview shows each row as the template renders it: prompt text, then the trained reply text.
- Start first estimates the job's memory (`glmapp.train.memory`) and refuses, with the estimate and what to
  change, when it would not fit in what is free beside the served model.
- Presets are the YAML files `glmapp train --config` reads, kept in DATA/presets/; a preset names data files
  of the data folder only (an upload is temporary).
- The hyperparameter widgets are made from `TrainConfig`'s fields (`HYPERPARAMETERS`), defaults included.
- When a job has written its adapter, each open page refreshes its adapter dropdowns once (a per-page state
  remembers which job it has shown) and offers "Compare with base": the Compare tab with the base model and
  the new adapter in two columns, the prompt set to the first user turn of the job's eval (else training) data.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import gradio as gr

from glmapp.errors import GlmappError
from glmapp.tokenizer import ChatGLMTokenizer, detect_family
from glmapp.train import memory
from glmapp.train.config import ConfigError, TrainConfig, read_yaml, write_yaml
from glmapp.train.data import read_file
from glmapp.train.examples import build_rows
from glmapp.train.job import JobRunner
from glmapp.ui.adapter_handlers import BASE
from glmapp.ui.i18n import ENGLISH, lang_of, t, ui

HYPERPARAMETERS = ("rank", "alpha", "dropout", "targets", "epochs", "max_steps", "lr", "batch_size", "grad_accum",
                   "max_length", "overlength", "warmup_ratio", "scheduler", "weight_decay", "seed", "quant",
                   "save_steps", "eval_steps", "early_stopping_patience", "layer_lr", "lora_l2", "dtype", "device",
                   "gradient_checkpointing")
CHECKPOINTING = {"auto": None, "on": True, "off": False}  # the tri-state TrainConfig field as a dropdown
_INTS = ("rank", "max_steps", "batch_size", "grad_accum", "max_length", "seed", "save_steps", "eval_steps")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PREVIEW_ROWS = 5
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s/:'\"]+/)+([^\s/:'\"]*)")  # shown as …/its last part
PER_ROW = 4  # hyperparameter widgets per row
PRESETS = "presets"  # folder of saved settings inside the data folder


class TrainHandlers:
    def __init__(self, runner: JobRunner, data_dir: str | Path, served_model: str, disabled: str | None = None):
        self.runner = runner
        self.data_dir = Path(data_dir)
        self.served_model = served_model
        self.disabled = disabled  # why training is off here (e.g. a public link without login), or None
        self.prompts: dict[str, str] = {}  # job name -> the prompt "Compare with base" fills in

    def data_file(self, choice: str | None, upload: str | None) -> str:
        """The data file to use: an upload, else a file name inside the data folder."""
        if upload:
            return str(upload)  # Gradio gives a str subclass that YAML cannot write
        if not choice:
            raise GlmappError("Choose a data file from the data folder or upload one (.jsonl or .json).")
        path = self.data_dir / choice
        if Path(choice).name != choice or not path.is_file():
            raise GlmappError(f"No data file named {choice!r} in the data folder.")
        return str(path)

    def data_choices(self) -> list[str]:
        if not self.data_dir.is_dir():
            return []
        return sorted(p.name for p in self.data_dir.iterdir() if p.suffix in (".jsonl", ".json") and p.is_file())

    @staticmethod
    def _folder(model: str) -> Path | None:
        """The model's local folder: the path itself, or a hub id's copy in the Hugging Face cache (never a
        download from here); None when neither exists."""
        folder = Path(model)
        if folder.is_dir():
            return folder
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached, or not a valid id: same answer to the user
            return None

    def _tokenizer(self, model: str) -> ChatGLMTokenizer:
        model = model or self.served_model
        folder = self._folder(model)
        if folder is None or not (folder / "tokenizer.model").is_file():
            raise GlmappError(f"No tokenizer.model for {model!r}: give a model folder or a hub id in the cache.")
        return ChatGLMTokenizer.from_pretrained(folder, family=detect_family(folder))

    def preview(self, model: str, choice: str | None, upload: str | None, max_length: int, overlength: str,
                lang: str = ENGLISH):
        """(rows of [prompt, reply] as the template renders them, validation report in Markdown)."""
        try:
            tokenizer = self._tokenizer(model)
            rows, report = build_rows(tokenizer, [self.data_file(choice, upload)], int(max_length), overlength)
        except GlmappError as e:
            return [], t("train.cannot_use", lang, error=e)
        import pandas as pd

        table = []
        for row in rows[:PREVIEW_ROWS]:
            start = next(i for i, x in enumerate(row.labels) if x != -100)
            table.append([tokenizer.decode(row.input_ids[:start]), tokenizer.decode(row.input_ids[start:])])
        headers = [t("train.preview.prompt", lang), t("train.preview.reply", lang)]
        lines = report.lines(lambda key, **values: t(f"train.report.{key}", lang, **values))
        return pd.DataFrame(table, columns=headers), "\n".join(f"- {line}" for line in lines)

    def eval_file(self, choice: str | None) -> str | None:
        return self.data_file(choice, None) if choice else None

    def _config(self, model: str, data: list[str], eval_choice: str | None, out: Path | None, values) -> TrainConfig:
        """TrainConfig from the tab's widgets (values in HYPERPARAMETERS order); ConfigError names a bad one."""
        settings = dict(zip(HYPERPARAMETERS, values))
        if isinstance(settings["targets"], list):
            settings["targets"] = ",".join(settings["targets"])
        for key in _INTS:
            if settings[key] is None:
                raise ConfigError(f"{key} is empty: give a whole number.")
            settings[key] = int(settings[key])
        patience = settings["early_stopping_patience"]
        settings["early_stopping_patience"] = int(patience) if patience else None
        settings["gradient_checkpointing"] = CHECKPOINTING.get(settings["gradient_checkpointing"])
        return TrainConfig(model=model or self.served_model, data=data, eval=self.eval_file(eval_choice),
                           out=str(out) if out else None, **settings)

    def start(self, model: str, choice: str | None, upload: str | None, eval_choice: str | None, name: str,
              *values, lang: str = ENGLISH) -> str:
        if self.disabled:
            return t("train.is_off", lang, why=self.disabled)
        name = (name or "").strip()
        if not _NAME.match(name):
            return t("train.bad_name", lang)
        out = self.runner.adapters_dir / name
        if out.exists():
            return t("train.name_taken", lang, name=repr(name))
        try:
            config = self._config(model, [self.data_file(choice, upload)], eval_choice, out, values)
            self.runner.ensure_idle()
            folder = self._folder(config.model)
            # A model not found here is reported by the run itself, with the places it looked.
            fits = memory.check(config, folder) if folder is not None else ""
            job = self.runner.start(config, name)
        except GlmappError as e:
            return t("train.not_started", lang, error=e)
        self.prompts[job.name] = first_prompt(config.eval or config.data[0])
        return t("train.started", lang, name=repr(job.name)) + (f" {fits}" if fits else "")

    # ---- presets: the YAML files `glmapp train --config` reads ------------------------------------------
    @property
    def presets_dir(self) -> Path:
        return self.data_dir / PRESETS

    def preset_choices(self) -> list[str]:
        return sorted(p.stem for p in self.presets_dir.glob("*.yaml")) if self.presets_dir.is_dir() else []

    def save_preset(self, preset: str, model: str, choice: str | None, eval_choice: str | None, name: str,
                    *values, lang: str = ENGLISH) -> str:
        """Write the tab's settings to PRESETS/<preset>.yaml -> status. An upload is not kept (it is temporary):
        the preset names a file of the data folder, or none."""
        preset = (preset or "").strip()
        if not _NAME.match(preset):
            return t("train.bad_preset_name", lang)
        name = (name or "").strip()
        try:
            data = [self.data_file(choice, None)] if choice else []
            config = self._config(model, data, eval_choice, self.runner.adapters_dir / name if _NAME.match(name)
                                  else None, values)
        except GlmappError as e:
            return t("train.not_saved", lang, error=e)
        self.presets_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(config, self.presets_dir / f"{preset}.yaml")
        return (t("train.preset_saved", lang, name=repr(preset), path=f"{PRESETS}/{preset}.yaml")
                + ("" if data else " " + t("train.preset_no_data", lang)))

    def load_preset(self, preset: str | None):
        """(model, data choice, eval choice, adapter name, *HYPERPARAMETERS values, status) from a preset;
        on a bad preset the widgets stay as they are (gr.skip) and the status says what is wrong."""
        keep = (gr.skip(),) * (4 + len(HYPERPARAMETERS))
        if not preset or preset not in self.preset_choices():
            return (*keep, "Choose a saved preset.")
        try:
            config = TrainConfig(**read_yaml(str(self.presets_dir / f"{preset}.yaml")))
        except (GlmappError, TypeError) as e:
            return (*keep, f"Cannot load preset {preset!r}: {e}")
        inside = set(self.data_choices())

        def choice(path):
            return Path(path).name if path and Path(path).parent == self.data_dir and Path(path).name in inside \
                else None

        data = choice(config.data[0]) if config.data else None
        model = "" if config.model in (None, self.served_model) else config.model
        name = Path(config.out).name if config.out else ""
        missing = [Path(p).name for p in [*config.data, config.eval] if p and choice(p) is None]
        note = f" Not in the data folder (choose again): {', '.join(missing)}." if missing else ""
        values = [getattr(config, n) for n in HYPERPARAMETERS]
        values[HYPERPARAMETERS.index("gradient_checkpointing")] = next(
            k for k, v in CHECKPOINTING.items() if v is config.gradient_checkpointing)
        return (model, data, choice(config.eval), name, *values,
                f"Loaded preset {preset!r}.{note}")

    def finished_adapter(self) -> str | None:
        """The last job's adapter name once it ended with its adapter written, else None."""
        job = self.runner.job
        if job is None or job.process.poll() != 0 or not (job.out / "adapter_config.json").is_file():
            return None
        return job.name

    def compare_prompt(self, name: str) -> str:
        return self.prompts.get(name, "")

    def stop(self, lang: str = ENGLISH) -> str:
        return t("train.stopped" if self.runner.stop() else "train.none_running", lang)

    def poll(self, lang: str = ENGLISH):
        """(progress Markdown, progress bar HTML, loss plot rows [step, loss, kind], last log lines)."""
        progress = self.runner.progress()
        if progress is None:
            return t("train.no_job", lang), "", [], ""
        total = progress["total"] or "?"
        sep = t("train.sep", lang)
        text = (f"**{progress['name']}**: {progress['status']} — "
                + t("train.step", lang, step=progress["step"], total=total)
                + (sep + t("train.loss_value", lang, loss=f"{progress['loss']:.4f}") if progress["loss"] is not None
                   else "")
                + (sep + t("stats.speed", lang, rate=progress["tokens_per_s"]) if progress["tokens_per_s"] is not None
                   else "")
                + (sep + t("train.elapsed", lang, s=f"{progress['elapsed']:.0f}") if progress["elapsed"] is not None
                   else "")
                + (sep + t("train.eta", lang, s=f"{progress['eta']:.0f}") if progress["eta"] is not None else ""))
        points = [[e["step"], e["loss"], "train"] for e in progress["log"] if e.get("loss") is not None]
        points += [[e["step"], e["eval_loss"], "eval"] for e in progress["log"] if e.get("eval_loss") is not None]
        bar = (f'<progress value="{int(progress["step"])}" max="{int(progress["total"])}"></progress>'
               if progress["total"] else "")
        return text, bar, points, "\n".join(_ABSOLUTE_PATH.sub(r"…/\1", line) for line in progress["tail"])


def first_prompt(path: str) -> str:
    """The first user turn of a data file ("" when it cannot be read: the training run reports why)."""
    try:
        _, records = read_file(path, "chatglm3")  # the family with every role: any valid file reads
    except GlmappError:
        return ""
    return next((m["content"] for m in records[0].messages if m["role"] == "user"), "")


def train_handlers(backend, config) -> TrainHandlers:
    """The Train tab's handlers for the app: jobs write into the adapters folder, data from `config.data_dir`.
    A public link without a login turns training off (anyone holding the link could run code on the GPU)."""
    public = config.share and not (config.auth or config.auth_file)
    disabled = ("this app is shared by a public link without --auth; anyone with the link could run training "
                "on this machine. Add --auth, or --allow-train to override.") \
        if public and not config.allow_train else None
    return TrainHandlers(JobRunner(backend.adapters_dir), config.data_dir, backend.name, disabled)


def _hyperparameter(f):
    """The widget of one TrainConfig field, with its help as the label and its default as the value."""
    # The English help is TrainConfig's own (tests/ui/test_i18n.py checks en.json has it word for word).
    label, elem_id = f"{f.name} — " + ui(f"train.hp.{f.name}"), f"train-{f.name.replace('_', '-')}"
    if "choices" in f.metadata:
        return gr.Dropdown(label=label, choices=list(f.metadata["choices"]), value=f.default, elem_id=elem_id)
    if f.name == "gradient_checkpointing":
        return gr.Dropdown(label=label, choices=list(CHECKPOINTING), value=next(iter(CHECKPOINTING)), elem_id=elem_id)
    if f.type in ("int", "float", "int | None"):
        return gr.Number(label=label, value=f.default, elem_id=elem_id)
    return gr.Textbox(label=label, value=f.default, elem_id=elem_id)


def create_train_tab(handlers: TrainHandlers, language=None) -> dict:
    """Widgets of the Train tab, wired to `handlers` (call inside a `gr.Tab`). `language`: the page's language
    switch; the handlers' messages are written in its language (None: English)."""
    import pandas as pd

    defaults = {f.name: f for f in fields(TrainConfig)}
    w: dict = {}
    if handlers.disabled:
        gr.Markdown(ui("train.off") + f" {handlers.disabled}")
    with gr.Row():
        w["model"] = gr.Textbox(label=ui("train.model"), value="",
                                elem_id="train-model")
        w["data"] = gr.Dropdown(label=ui("train.data"), choices=handlers.data_choices(), value=None,
                                elem_id="train-data")
        w["upload"] = gr.File(label=ui("train.upload"), file_types=[".jsonl", ".json"], type="filepath",
                              elem_id="train-upload")
        w["eval"] = gr.Dropdown(label=ui("train.eval"),
                                choices=handlers.data_choices(), value=None, elem_id="train-eval")
    w["preview_btn"] = gr.Button(ui("train.preview"), elem_id="train-preview")
    w["table"] = gr.Dataframe(headers=[t("train.preview.prompt", ENGLISH), t("train.preview.reply", ENGLISH)],
                              interactive=False,
                              elem_id="train-table")
    w["report"] = gr.Markdown(elem_id="train-report")
    values = []
    with gr.Accordion(ui("train.hyperparameters"), open=False, elem_id="train-hyperparameters"):
        for first in range(0, len(HYPERPARAMETERS), PER_ROW):
            with gr.Row():
                values += [_hyperparameter(defaults[name]) for name in HYPERPARAMETERS[first:first + PER_ROW]]
    with gr.Row():
        w["preset"] = gr.Dropdown(label=ui("train.preset"), choices=handlers.preset_choices(), value=None,
                                  allow_custom_value=True, info=ui("train.preset_info"))
        w["load_preset"] = gr.Button(ui("train.load_preset"))
        w["save_preset"] = gr.Button(ui("train.save_preset"))
    with gr.Row():
        w["name"] = gr.Textbox(label=ui("train.name"), placeholder="my-adapter", elem_id="train-name")
        w["start"] = gr.Button(ui("train.start"), variant="primary", interactive=handlers.disabled is None,
                               elem_id="train-start")
        w["stop"] = gr.Button(ui("chat.stop"), variant="stop", elem_id="train-stop")
        w["compare"] = gr.Button(ui("train.compare"), elem_id="train-compare", visible=False)
    w["status"] = gr.Markdown(elem_id="train-status")
    w["progress"] = gr.Markdown(elem_id="train-progress")
    w["bar"] = gr.HTML("", elem_id="train-bar")  # step/total as a <progress> bar (numbers only)
    w["plot"] = gr.LinePlot(x="step", y="loss", color="kind", title=ui("train.loss"), elem_id="train-plot")
    w["log"] = gr.Textbox(label=ui("train.log"), lines=8, interactive=False, elem_id="train-log")
    timer = gr.Timer(2.0)

    length = [values[HYPERPARAMETERS.index("max_length")], values[HYPERPARAMETERS.index("overlength")]]
    # The language comes first among the inputs (the handlers take *values, after which Gradio passes no request).
    lang_in = [language] if language is not None else []

    def in_language(method):
        def handler(*inputs):
            lang, rest = (inputs[0], inputs[1:]) if lang_in else (ENGLISH, inputs)
            return method(*rest, lang=lang)
        return handler

    w["preview_btn"].click(in_language(handlers.preview), [*lang_in, w["model"], w["data"], w["upload"], *length],
                           [w["table"], w["report"]])
    w["start"].click(in_language(handlers.start),
                     [*lang_in, w["model"], w["data"], w["upload"], w["eval"], w["name"], *values], w["status"])
    fields_in = [w["model"], w["data"], w["eval"], w["name"], *values]

    def save(*inputs, lang=ENGLISH):
        return handlers.save_preset(*inputs, lang=lang), gr.update(choices=handlers.preset_choices())

    w["save_preset"].click(in_language(save), [*lang_in, w["preset"], *fields_in], [w["status"], w["preset"]])
    w["load_preset"].click(handlers.load_preset, w["preset"], [*fields_in, w["status"]])
    w["stop"].click(in_language(handlers.stop), lang_in, w["status"])

    def poll(request: gr.Request = None):
        text, bar, points, log = handlers.poll(lang_of(request))
        return text, bar, pd.DataFrame(points, columns=["step", "loss", "kind"]), log

    timer.tick(poll, None, [w["progress"], w["bar"], w["plot"], w["log"]], api_visibility="private",
               show_progress="hidden")
    w["timer"] = timer
    return w


def wire_train_results(tabs, w: dict, handlers: TrainHandlers, adapter_choices, dropdowns: list, compare: dict
                       ) -> None:
    """A finished job's adapter in every adapter dropdown of the page, and "Compare with base" -> the Compare tab
    with the base model (A) and the new adapter (B). `adapter_choices()`: the picker's (label, value) list."""
    shown = gr.State(None)  # the finished job this page has refreshed its dropdowns for

    def on_tick(seen):
        name = handlers.finished_adapter()
        if name is None or name == seen:
            return seen, gr.update(visible=name is not None), *(gr.skip() for _ in dropdowns)
        choices = adapter_choices()
        return name, gr.update(visible=True), *(gr.update(choices=choices) for _ in dropdowns)

    w["timer"].tick(on_tick, shown, [shown, w["compare"], *dropdowns], api_visibility="private",
                    show_progress="hidden")

    def to_compare(request: gr.Request = None):
        name = handlers.finished_adapter()
        if name is None:
            raise gr.Error(t("train.no_finished_job", lang_of(request)))
        choices = adapter_choices()
        return (gr.Tabs(selected="compare"), 2, gr.update(choices=choices, value=BASE),
                gr.update(choices=choices, value=name), handlers.compare_prompt(name))

    a, b = compare["adapters"][:2]
    w["compare"].click(to_compare, None, [tabs, compare["n_columns"], a, b, compare["prompt"]],
                       api_visibility="private")
