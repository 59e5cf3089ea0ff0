"""`glmapp <command>`: one dispatch table of subcommands, each a plain function.

Every `GlmappError` becomes a one-paragraph message on stderr and exit code 2, never a traceback.
Nothing heavy is imported until a command runs, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from glmapp.choices import DEFAULT_MODEL, DEMO_DEFAULTS, DEMO_FORMATS, DEMO_SIZES, FAMILIES, QUANT_MODES
from glmapp.errors import CheckpointError, GlmappError

DEMO_HINT = "Run with --demo to chat with the built-in demo checkpoint (random weights, gibberish replies)."
CHAT_COMMANDS = ("In the chat, type `clear` to reset the history and `exit` (or `quit`) to quit; Ctrl+C stops a "
                 "reply, Ctrl+D quits.")

# C0/C1 control characters except newline and tab, and the bidirectional controls: written raw they ring
# the bell, clear the screen, move the cursor, start escape sequences or reorder the rest of the line.
_NON_PRINTING = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with each non-printing character written as its escape (`\\x07`, `\\x1b`, `\\u202e`).

    The same on a terminal and in a piped transcript: the output stays plain text, and a reader still sees
    that the model produced the character."""
    return _NON_PRINTING.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"folder or hub id (default: {DEFAULT_MODEL}, or the demo checkpoint when it is not found)")
    p.add_argument("--demo", action="store_true", help="use the demo checkpoint (random weights)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16/fp16 on GPU, fp32 on CPU), float32, float16, bfloat16 (default: %(default)s)")
    p.add_argument("--quant", default=None, choices=QUANT_MODES,
                   help="weight quantization (default: as the checkpoint is stored): int8/int4 = ChatGLM's own "
                        "scheme, bnb-int8/bnb-nf4 = bitsandbytes")


def load_for_cli(args, stdin_is_tty: bool | None = None):
    """Load --model, or the demo checkpoint with --demo or when the user accepts the offer."""
    import glmapp
    from glmapp.demo import ensure_demo

    if args.demo:
        path = ensure_demo(getattr(args, "family", None) or "chatglm2")
        print(f"[demo] Using the demo checkpoint at {path} (random weights: replies are gibberish).",
              file=sys.stderr)
        return glmapp.load(str(path), device=args.device, dtype=args.dtype, quant=getattr(args, "quant", None))
    try:
        return glmapp.load(args.model or DEFAULT_MODEL, device=args.device, dtype=args.dtype,
                           quant=getattr(args, "quant", None))
    except CheckpointError as e:
        if args.model is None:  # the default model is simply not installed: fall back, clearly labelled
            print(f"{e}\n", file=sys.stderr)
            args.demo = True
            return load_for_cli(args)
        tty = sys.stdin.isatty() if stdin_is_tty is None else stdin_is_tty
        if not tty:
            raise CheckpointError(f"{e}\n{DEMO_HINT}") from None
        print(f"{e}\n", file=sys.stderr)
        answer = input("Chat with the demo checkpoint instead? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            raise
        args.demo = True
        return load_for_cli(args)


def backend_for_cli(args):
    """The Backend `glmapp chat` talks to: a model server with --backend-url, else the local model (its host
    and one engine), with --adapter made resident."""
    if args.backend_url:
        from glmapp.backends.remote import RemoteBackend

        backend = RemoteBackend(args.backend_url, args.backend_key or os.environ.get("GLMAPP_BACKEND_KEY"))
        print(f"glmapp chat: {backend.name} ({backend.family}) served by {len(backend.replicas)} model server(s). "
              "Type `clear` to reset, `exit` to quit.", file=sys.stderr)
        return backend, args.adapter and backend.load_adapter(args.adapter).name
    from glmapp import adapter_hub
    from glmapp.backends import LocalBackend
    from glmapp.engine.engine import EngineConfig
    from glmapp.host import ModelHost

    model, tokenizer = load_for_cli(args)
    config = EngineConfig(kv_cache_mb=args.kv_cache_mb, compile=args.compile, output_quant=args.output_quant)
    host = ModelHost(model, tokenizer, str(model.config.name_or_path), adapters_dir=args.adapters_dir,
                     engine_config=config)
    print(f"glmapp chat: {host.name} ({tokenizer.family}, {model.dtype}, {model.device}). "
          "Type `clear` to reset, `exit` to quit.", file=sys.stderr)
    adapter = None
    if args.adapter:
        info = host.load_adapter(args.adapter, confine=False, download=adapter_hub.download)
        adapter = info.name
        kind = "P-tuning v2 prefix" if info.kind == "ptuning" else "LoRA adapter"
        print(f"{kind} {adapter!r} applied.", file=sys.stderr)
    return LocalBackend(host), adapter


def cmd_chat(args) -> int:
    """Terminal chat with streaming output. Commands: `clear` resets history, `exit` quits."""
    from glmapp.engine.sampling import SamplingParams

    backend, adapter = backend_for_cli(args)
    defaults = DEMO_DEFAULTS.get(backend.family, DEMO_DEFAULTS["chatglm2"])  # one set of defaults: the app's
    params = SamplingParams(temperature=defaults["temperature"] if args.temperature is None else args.temperature,
                            top_p=defaults["top_p"] if args.top_p is None else args.top_p, top_k=args.top_k,
                            repetition_penalty=args.repetition_penalty, seed=args.seed)
    history: list = []
    echo = not sys.stdin.isatty()  # piped input is not echoed by a terminal: show it, so the transcript reads
    try:
        while True:
            try:
                query = input("\nUser: ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if echo:
                print(printable(query))
            command = query.strip().lower()
            if command in ("exit", "quit", "stop"):
                return 0
            if command == "clear":
                history = []
                print("(history cleared)")
                continue
            history = _reply(backend, query, history, args, params, adapter)
    finally:
        backend.close()


def _reply(backend, query: str, history: list, args, params, adapter) -> list:
    """Stream one reply to the terminal -> the history after it (unchanged when it failed or was stopped)."""
    print("ChatGLM: ", end="", flush=True)
    shown, update = "", None
    stream = backend.chat_stream(query, history, system=args.system, max_length=args.max_length,
                                 max_new_tokens=args.max_new_tokens, params=params, adapter=adapter)
    try:
        for update in stream:
            text = update.response if isinstance(update.response, str) else str(update.response)
            if text.startswith(shown):
                print(printable(text[len(shown):]), end="", flush=True)
            else:  # post-processing rewrote earlier text (e.g. strip): show the final form
                print("\n" + printable(text), end="", flush=True)
            shown = text
    except KeyboardInterrupt:
        stream.close()  # cancels the request
        print("\n(stopped)")
        return history
    except GlmappError as e:
        print(f"\n[error] {printable(str(e))}")
        return history
    if update is None or update.error:
        print(f"\n[error] {printable(update.error if update else 'no reply')}")
        return history
    usage = update.usage
    if usage is not None:
        print(f"\n[{usage.completion_tokens} tokens, {usage.decode_tokens_per_second:.1f} tok/s, "
              f"{usage.cached_tokens} prompt tokens reused]", file=sys.stderr)
    return update.history


def cmd_make_demo(args) -> int:
    from glmapp.demo import make_demo

    t0 = time.perf_counter()
    out = make_demo(args.out, family=args.family, size=args.size, fmt=args.format, seed=args.seed)
    print(f"Wrote {args.family} demo checkpoint ({args.size}, {args.format}) to {out} "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_merge(args) -> int:
    from glmapp.adapters import export_merged

    out = export_merged(args.base, args.adapter, args.out, args.adapters_dir, args.dtype)
    print(f"Merged {args.adapter} into {args.base}: wrote {out}")
    return 0


def cmd_export_gguf(args) -> int:
    from glmapp.gguf_export import export_gguf

    if args.demo == (args.model is not None):
        raise CheckpointError("export-gguf needs exactly one of --model M or --demo.")
    if args.demo:
        from glmapp.demo import ensure_demo

        args.model = str(ensure_demo())
    t0 = time.perf_counter()
    result = export_gguf(args.model, args.out, args.type, output_type=args.output_type, adapter=args.adapter,
                         adapters_dir=args.adapters_dir)
    print(f"Wrote {result.path} ({result.type}, {result.tensors} tensors, {result.bytes / 2**20:.1f} MiB) "
          f"in {time.perf_counter() - t0:.1f}s; run it with llama.cpp: llama-cli -m {result.path}")
    return 0


def cmd_train(args) -> int:
    from glmapp.train.config import from_args
    from glmapp.train.run import train

    train(from_args(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmapp", description="Run and chat with ChatGLM2/ChatGLM3 models.",
                                     epilog="glmapp chat: " + CHAT_COMMANDS)
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat in the terminal with streaming output",
                          description="Chat with a ChatGLM2/ChatGLM3 model in the terminal, with streaming output. "
                                      + CHAT_COMMANDS)
    _add_model_args(chat)
    chat.add_argument("--max-length", type=int, default=8192, help="prompt + reply tokens (default: %(default)s)")
    chat.add_argument("--max-new-tokens", type=int, default=None,
                      help="reply tokens at most (default: what --max-length leaves after the prompt)")
    per_family = {key: ", ".join(f"{family} {d[key]}" for family, d in DEMO_DEFAULTS.items())
                  for key in ("temperature", "top_p")}  # the official demos' values, as the app's sliders
    chat.add_argument("--temperature", type=float, default=None,
                      help=f"0 = greedy (default per family: {per_family['temperature']})")
    chat.add_argument("--top-p", type=float, default=None,
                      help=f"nucleus sampling (default per family: {per_family['top_p']})")
    chat.add_argument("--top-k", type=int, default=0, help="0 = off (default: %(default)s)")
    chat.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (default: %(default)s)")
    chat.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    chat.add_argument("--system", default=None, help="system prompt (ChatGLM3)")
    chat.add_argument("--kv-cache-mb", type=float, default=None,
                      help="KV cache budget (default: 90%% of free GPU memory, 512 MB on CPU)")
    chat.add_argument("--compile", action="store_true",
                      help="torch.compile the decode step (CUDA: minutes of warm-up for faster decoding)")
    chat.add_argument("--output-quant", choices=("none", "int8", "int4"), default="none",
                      help="CPU decoding reads an int8 or int4 copy of the output layer (default: %(default)s)")
    chat.add_argument("--adapters-dir", default="adapters", help="folder of LoRA adapters (default: %(default)s)")
    chat.add_argument("--adapter", default=None, help="LoRA adapter: folder name in --adapters-dir, or a hub id")
    chat.add_argument("--backend-url", action="append", default=None, metavar="URL",
                      help="chat with an OpenAI-compatible model server (vLLM, a glmapp app) instead of a local "
                           "model; repeat for replicas")
    chat.add_argument("--backend-key", default=None, help="its bearer key (env GLMAPP_BACKEND_KEY is preferred)")
    chat.set_defaults(func=cmd_chat)
    demo = sub.add_parser("make-demo", help="write a small random checkpoint in the official format")
    demo.add_argument("--family", choices=FAMILIES, default="chatglm2", help="(default: %(default)s)")
    demo.add_argument("--out", required=True, help="folder to write")
    demo.add_argument("--size", choices=DEMO_SIZES, default="tiny", help="(default: %(default)s)")
    demo.add_argument("--format", choices=DEMO_FORMATS, default="safetensors-sharded", help="(default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    demo.set_defaults(func=cmd_make_demo)
    merge = sub.add_parser("merge", help="merge a LoRA adapter into its base and write the official layout")
    merge.add_argument("base", help="base model folder or hub id")
    merge.add_argument("adapter", help="adapter folder name inside --adapters-dir, or a hub id")
    merge.add_argument("--out", required=True)
    merge.add_argument("--adapters-dir", default="adapters", help="(default: %(default)s)")
    merge.add_argument("--dtype", default=None, help="float16 | bfloat16 | float32 (default: the base's dtype)")
    merge.set_defaults(func=cmd_merge)
    from glmapp.gguf_export import TYPES as GGUF_TYPES

    export = sub.add_parser("export-gguf", help="write a ChatGLM2/3 model as one GGUF file for llama.cpp",
                            description="Write a ChatGLM2/ChatGLM3 checkpoint (optionally with a LoRA adapter "
                                        "merged in) as a GGUF file that llama.cpp's chatglm architecture, Ollama "
                                        "and LM Studio load. ChatGLM-6B (v1) is not supported by llama.cpp.")
    export.add_argument("--model", default=None, help="checkpoint folder or hub id")
    export.add_argument("--demo", action="store_true", help="export the demo checkpoint (random weights)")
    export.add_argument("--out", required=True, help="the .gguf file to write")
    export.add_argument("--type", choices=GGUF_TYPES, default="bf16",
                        help="type of the 2-D weights; norms and biases stay f32 (default: %(default)s)")
    export.add_argument("--output-type", choices=GGUF_TYPES, default=None,
                        help="type of the output layer (default: as --type)")
    export.add_argument("--adapter", default=None, help="LoRA adapter to merge in: folder name in --adapters-dir")
    export.add_argument("--adapters-dir", default="adapters", help="(default: %(default)s)")
    export.set_defaults(func=cmd_export_gguf)
    from glmapp.train.config import add_arguments as add_train_arguments

    train = sub.add_parser("train", help="fine-tune a LoRA adapter (QLoRA over a quantized base with --quant)",
                           description="LoRA / QLoRA fine-tuning with transformers' Trainer and peft; writes a "
                                       "PEFT adapter folder the app's picker lists.")
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command == "train":  # a program, not a caller's process: it may re-execute
        from glmapp.allocator import reexec_with_tcmalloc

        reexec_with_tcmalloc(sys.argv[1:])
    try:
        return args.func(args)
    except GlmappError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
