"""The web app in English and Simplified Chinese: one translation table, used by the page and the handlers.

Notable choices:
- One JSON file per language in `locales/` (`en.json`, `zh-CN.json`), flat and keyed by stable ids
  (`tab.chat`, `chat.send`, `stats.tokens_per_second`); English is the reference and the fallback.
- Text the layout builds once (labels, buttons, tab names, help texts) is handed to Gradio's own i18n as
  `ui(key)` (a `gr.I18n` key) and translated in the browser. Those strings are ICU messages there, so keys
  used by the layout hold no `{placeholders}`.
- Text a handler makes while the app runs (stats line, banners, errors, notices) cannot be translated in
  the browser: handlers call `t(key, lang, **values)` with `lang = lang_of(request)`, which reads the
  language the page chose (the `glmapp-lang` cookie, set by the switch and at page load) and otherwise
  the request's Accept-Language header.
- The language follows the browser: zh, zh-CN, zh-SG and zh-Hans* read Chinese; everything else (zh-TW,
  zh-HK, zh-Hant included) reads English. The header's switch overrides it and is remembered in the
  browser's localStorage.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import gradio as gr

ENGLISH, CHINESE = "en", "zh-CN"
LANGUAGES = (ENGLISH, CHINESE)
LANGUAGE_CHOICES = [("English", ENGLISH), ("中文", CHINESE)]  # each name in its own language: not translated
COOKIE = "glmapp-lang"
STORAGE_KEY = "glmapp-lang"
LOCALES_DIR = Path(__file__).with_name("locales")
_CHINESE_TAG = re.compile(r"^zh(-(cn|sg|hans)([-_].*)?)?$", re.IGNORECASE)


@lru_cache(maxsize=None)
def table(lang: str) -> dict[str, str]:
    """The translation file of `lang` (key -> text)."""
    return json.loads((LOCALES_DIR / f"{lang}.json").read_text(encoding="utf-8"))


def language(tag: str | None) -> str:
    """A browser language tag -> the app's language: Simplified Chinese tags -> zh-CN, others -> en."""
    tag = (tag or "").strip().replace("_", "-")
    return CHINESE if _CHINESE_TAG.match(tag) else ENGLISH


def from_accept_language(header: str | None) -> str:
    """The app's language for an Accept-Language header: its most preferred tag decides."""
    best, best_q = None, -1.0
    for part in (header or "").split(","):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if tag and tag != "*" and q > best_q:
            best, best_q = tag, q
    return language(best)


def lang_of(request) -> str:
    """The language of the page that sent `request` (a gr.Request; None for scripts and tests -> English)."""
    if request is None:
        return ENGLISH
    try:
        chosen = request.cookies.get(COOKIE)
    except AttributeError:
        chosen = None
    if chosen in LANGUAGES:
        return chosen
    headers = getattr(request, "headers", None) or {}
    return from_accept_language(headers.get("accept-language"))


def t(key: str, lang: str = ENGLISH, **values) -> str:
    """The text of `key` in `lang` (English when the key or language is missing), with `values` filled in."""
    text = table(lang if lang in LANGUAGES else ENGLISH).get(key)
    if text is None:
        text = table(ENGLISH)[key]  # an unknown key is a bug: KeyError names it
    return text.format(**values) if values else text


def ui(key: str):
    """A layout string: translated in the browser by Gradio's i18n (the key must exist in every file)."""
    if key not in table(ENGLISH):
        raise KeyError(f"no translation key {key!r} in {LOCALES_DIR / 'en.json'}")
    return I18N(key)


def error_text(error, lang: str) -> str:
    """A GlmappError as the reader reads it: in English its own message (also what logs and the API keep);
    in another language the translation of its code, with the English message as the detail where the
    translation has a `{detail}` place for it."""
    code = getattr(error, "code", None)
    if lang == ENGLISH or not code or f"error.{code}" not in table(lang):
        return str(error)
    return t(f"error.{code}", lang, detail=str(error))


def number(value: float, lang: str = ENGLISH, digits: int = 0) -> str:
    """A number for the reader: thousands grouped with commas in both languages (the usual form in
    Simplified Chinese too), `digits` decimals."""
    return f"{value:,.{digits}f}"


# Gradio's i18n: "zh" too, so a browser locale the Gradio front end reduces to "zh" still finds the Chinese.
I18N = gr.I18n(**{ENGLISH: table(ENGLISH), CHINESE: table(CHINESE), "zh": table(CHINESE)})

# The language switch and page load, in the browser: remember the choice (localStorage), tell the server
# (cookie, read by `lang_of`) and switch Gradio's front-end locale in place, so the page (and the
# conversation in it) stays. Gradio exports `changeLocale` from its front-end core module; the module is
# found among the files the page loaded.
_SET_LANGUAGE_JS = """
async function glmappSetLanguage(lang, remember) {
  if (remember) localStorage.setItem(%(key)s, lang);
  document.cookie = %(cookie)s + "=" + lang + "; path=/; max-age=31536000; SameSite=Lax";
  document.documentElement.lang = lang;
  document.title = (%(titles)s)[lang] || document.title;
  const names = [...performance.getEntriesByType("resource").map((e) => e.name),
                 ...[...document.querySelectorAll("link[rel=modulepreload]")].map((l) => l.href)];
  const core = names.find((n) => /\\/assets\\/core-[\\w-]+\\.js(\\?|$)/.test(n));
  if (core) {
    try { (await import(core)).changeLocale(lang); } catch (e) { console.error("glmapp: language switch", e); }
  }
  return lang;
}
""" % {"key": json.dumps(STORAGE_KEY), "cookie": json.dumps(COOKIE),
       "titles": json.dumps({lang: table(lang)["app.title"] for lang in LANGUAGES}, ensure_ascii=False)}

PAGE_LOAD_JS = """
async () => {
  %(fn)s
  let lang = localStorage.getItem(%(key)s);
  if (!%(langs)s.includes(lang)) {
    const tag = ((navigator.languages && navigator.languages[0]) || navigator.language || "en").replace("_", "-");
    lang = /^zh(-(cn|sg|hans)([-].*)?)?$/i.test(tag) ? "zh-CN" : "en";
  }
  return await glmappSetLanguage(lang, false);
}
""" % {"fn": _SET_LANGUAGE_JS, "key": json.dumps(STORAGE_KEY), "langs": json.dumps(list(LANGUAGES))}

SWITCH_JS = """
async (lang) => {
  %(fn)s
  return await glmappSetLanguage(lang, true);
}
""" % {"fn": _SET_LANGUAGE_JS}

# Chinese pages set in a CJK font stack (the page's `lang` is set by the scripts above); English pages keep
# the theme's fonts.
CJK_FONT_CSS = """
html:lang(zh-CN) .gradio-container {
  --font: "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "PingFang SC", "Hiragino Sans GB",
          "Microsoft YaHei", "WenQuanYi Micro Hei", ui-sans-serif, system-ui, sans-serif;
}
#language-switch { max-width: 240px; margin-left: auto; }
"""
