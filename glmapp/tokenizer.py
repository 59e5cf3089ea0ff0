"""ChatGLM tokenizers: v2/v3 (a SentencePiece model plus special ids appended after its vocab, spec §5.1, §5.2)
and v1 (`ChatGLM1Tokenizer`: ice_text.model, special tokens inside the model, text conventions, spec §5.3).

Notable choices:
- No transformers base class; the familiar methods (`encode`, `decode`, `__call__`, ...) are provided directly.
- Every encode with special tokens prepends `[gMASK] sop`; no bos is ever used; padding is on the left.
- v3 role-token strings typed by a user are plain text unless `encode_special_tokens=True` (injection guard).
  Only the four role tokens are recognised then, so words like "sop" in text stay text.
- `StreamDecoder` turns generated ids into text deltas that never split a UTF-8 character and join to `decode`.
- `train_demo_tokenizer` builds a small model with the same layout as the official tokenizer.model
  (BPE, byte fallback at ids 3..258 so "\\n" is 13, identity normalisation) for tests and the demo checkpoint.
- v1 keeps its special tokens as pieces of the SentencePiece model and looks their ids up by name, so the official
  ice_text.model (ids 130000+) and the small v1-style demo model (`train_demo_tokenizer_v1`, same pieces, low ids)
  work alike. Newline, tab and runs of 2..80 spaces become `<n>`, `<|tab|>`, `<|blank_k|>` before SentencePiece
  and are restored on decode; [gMASK] `<sop>` go *after* the text.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

import sentencepiece as spm

from glmapp.errors import TokenizerError

FAMILIES = ("chatglm2", "chatglm3")
V1_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
V1_MAX_BLANK = 80
V1_VOCAB_FILE = "ice_text.model"
COMMON_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 0


def train_demo_tokenizer(corpus_dir: Path, out_file: Path, vocab_size: int = 4000) -> None:
    """Train a deterministic demo SentencePiece model from every *.txt file in `corpus_dir`."""
    files = sorted(Path(corpus_dir).glob("*.txt"))
    if not files:
        raise TokenizerError(f"expected *.txt corpus files in '{Path(corpus_dir).name}', found none")
    lines = [line for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(0)  # trainer sampling is seeded globally, not via TrainerSpec
    with open(out_file, "wb") as model_writer:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model_writer,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9995,
            max_sentence_length=1 << 20,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )


def load_sentencepiece(path: Path, expected: str) -> spm.SentencePieceProcessor:
    """Open a SentencePiece model, or raise TokenizerError naming the file (never its full path)."""
    if not path.is_file():
        raise TokenizerError(
            f"expected {expected} in the model folder '{path.parent.name}', found no '{path.name}'; "
            f"copy {expected} from the original checkpoint next to config.json"
        )
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        # sentencepiece's message holds the absolute path; keep only the file name.
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].replace(str(path), path.name)
        raise TokenizerError(f"'{path.name}' is not a SentencePiece model ({reason}); re-download {expected}") from None


class ChatGLMTokenizer:
    """SentencePiece tokenizer with ChatGLM2/3 special ids, left padding and `[gMASK] sop` prefix."""

    def __init__(self, vocab_file, family: str = "chatglm2", encode_special_tokens: bool = False):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        path = Path(vocab_file)
        self.sp = load_sentencepiece(path, "tokenizer.model")
        self.vocab_file = str(path)
        self.family = family
        self.encode_special_tokens = encode_special_tokens
        n = self.sp.vocab_size()
        self.sp_vocab_size = n
        names = COMMON_SPECIAL_TOKENS + (ROLE_TOKENS if family == "chatglm3" else ())
        self.special_tokens = {name: n + i for i, name in enumerate(names)}
        self.id_to_special = {i: name for name, i in self.special_tokens.items()}
        self.vocab_size = n + len(names)
        self.pad_token_id, self.eos_token_id, self.unk_token_id = PAD_ID, EOS_ID, UNK_ID
        self.prefix_ids = [self.special_tokens["[gMASK]"], self.special_tokens["sop"]]
        if family == "chatglm3":
            self.stop_ids = [EOS_ID, self.special_tokens["<|user|>"], self.special_tokens["<|observation|>"]]
            self._role_pattern = re.compile("(" + "|".join(re.escape(t) for t in ROLE_TOKENS) + ")")
        else:
            self.stop_ids = [EOS_ID]
            self._role_pattern = None

    @classmethod
    def from_pretrained(cls, directory, family: str | None = None, **kwargs):
        """Load `directory/tokenizer.model` (v1: `ice_text.model`, a `ChatGLM1Tokenizer`); detect the family
        from tokenizer_config.json when not given."""
        directory = Path(directory)
        has_v1_vocab = (directory / V1_VOCAB_FILE).is_file()
        if family == "chatglm1" or (family is None and has_v1_vocab):
            return ChatGLM1Tokenizer(directory / V1_VOCAB_FILE)
        if has_v1_vocab and not (directory / "tokenizer.model").is_file():
            raise TokenizerError(f"family {family} does not fit this checkpoint: it has a ChatGLM-6B (v1) tokenizer "
                                 f"({V1_VOCAB_FILE}); leave the family out to detect it")
        if family is None:
            family = detect_family(directory)
        return cls(directory / "tokenizer.model", family=family, **kwargs)

    # ---- ids and pieces -------------------------------------------------------------------------
    def get_command(self, token: str) -> int:
        """Id of a special token such as "[gMASK]" or "<|user|>" (or of an sp control piece)."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        piece_id = self.sp.piece_to_id(token)
        if piece_id == UNK_ID and token != self.sp.id_to_piece(UNK_ID):
            raise KeyError(f"{token!r} is not a special token of {self.family}")
        return piece_id

    def tokenize(self, text: str) -> list[str]:
        return [self._id_to_token(i) for i in self._encode_text(text)]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.special_tokens.get(tokens, self.sp.piece_to_id(tokens))
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(int(i)) for i in ids]

    def _id_to_token(self, i: int) -> str:
        if i in self.id_to_special:
            return self.id_to_special[i]
        if 0 <= i < self.sp_vocab_size:
            return self.sp.id_to_piece(i)
        return self.sp.id_to_piece(UNK_ID)

    # ---- encode / decode ------------------------------------------------------------------------
    def sp_encode(self, text: str) -> list[int]:
        """Plain SentencePiece ids (with the dummy "▁" prefix, no special tokens)."""
        return self.sp.encode(text) if text else []

    def _encode_text(self, text: str) -> list[int]:
        if self._role_pattern is None or not self.encode_special_tokens:
            return self.sp_encode(text)
        ids: list[int] = []
        for part in self._role_pattern.split(text):
            if part in self.special_tokens:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.sp_encode(part))
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._encode_text(text)
        return self.prefix_ids + ids if add_special_tokens else ids

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """v3 message: role token + sp(metadata + "\\n") + sp(message), spec §5.2."""
        if self.family != "chatglm3":
            raise ValueError("role messages exist only in chatglm3")
        role_id = self.special_tokens.get(f"<|{role}|>")
        if role_id is None:
            raise ValueError(f"unknown role {role!r}; expected system, user, assistant or observation")
        return [role_id, *self.sp_encode(metadata + "\n"), *self.sp_encode(message)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; runs of sp ids decode together so byte-fallback pieces form real characters."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        keep_specials = self.family == "chatglm3" and not skip_special_tokens
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if 2 < i < self.sp_vocab_size:
                run.append(i)
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            if keep_specials and i in self.id_to_special:
                out.append(self.id_to_special[i])
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def __call__(self, texts, return_tensors: str | None = None, padding: bool = True):
        """Encode one text or a batch, left-padded with pad 0; also returns position_ids (spec §5.1)."""
        single = isinstance(texts, str)
        rows = [self.encode(t) for t in ([texts] if single else texts)]
        width = max(len(r) for r in rows) if padding else None
        batch = {"input_ids": [], "attention_mask": [], "position_ids": []}
        for r in rows:
            pad = (width - len(r)) if padding else 0
            batch["input_ids"].append([PAD_ID] * pad + r)
            batch["attention_mask"].append([0] * pad + [1] * len(r))
            batch["position_ids"].append([0] * pad + list(range(len(r))))
        if return_tensors == "pt":
            if len({len(r) for r in batch["input_ids"]}) > 1:
                raise ValueError("rows of different lengths need padding=True to become one tensor")
            import torch

            return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        return {k: v[0] for k, v in batch.items()} if single else batch


# ---- v1 (ChatGLM-6B, ice_text.model) ----------------------------------------------------------------
def v1_preprocess(text: str) -> str:
    """Spec §5.3: newline -> <n>, tab -> <|tab|>, runs of 2..80 spaces -> <|blank_k|> (longest first)."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for k in range(V1_MAX_BLANK, 1, -1):
        text = text.replace(" " * k, f"<|blank_{k}|>")
    return text


def v1_postprocess(text: str) -> str:
    """Inverse of `v1_preprocess` on decoded text."""
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for k in range(2, V1_MAX_BLANK + 1):
        text = text.replace(f"<|blank_{k}|>", " " * k)
    return text


V1_USER_SYMBOLS = ("<n>", *V1_SPECIAL_TOKENS, "<|tab|>", *(f"<|blank_{k}|>" for k in range(2, V1_MAX_BLANK + 1)))


def train_demo_tokenizer_v1(corpus_dir: Path, out_file: Path, vocab_size: int = 4000) -> None:
    """A small ice_text.model look-alike: <unk> <s> </s> <pad> at 0..3, `<n>` at 4 as in the official model, then
    the v1 special, tab and blank pieces as user-defined symbols; BPE with byte fallback on the v1-preprocessed
    corpus (every *.txt file in `corpus_dir`). Deterministic."""
    files = sorted(Path(corpus_dir).glob("*.txt"))
    if not files:
        raise TokenizerError(f"expected *.txt corpus files in '{Path(corpus_dir).name}', found none")
    lines = [v1_preprocess(line) for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(0)
    with open(out_file, "wb") as model_writer:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model_writer, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece="<pad>",
            user_defined_symbols=list(V1_USER_SYMBOLS), normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, character_coverage=0.9995,
            max_sentence_length=1 << 20, shuffle_input_sentence=False, num_threads=1, minloglevel=2,
        )


class ChatGLM1Tokenizer:
    """ChatGLM-6B tokenizer (spec §5.3): text ids + [gMASK] <sop>; pad `<pad>` on the left; stop on `<eop>`."""

    family = "chatglm1"

    def __init__(self, vocab_file, **_ignored):
        path = Path(vocab_file)
        self.sp = load_sentencepiece(path, V1_VOCAB_FILE)
        self.vocab_file = str(path)
        self.sp_vocab_size = self.vocab_size = self.sp.vocab_size()
        missing = [t for t in V1_USER_SYMBOLS if self.sp.piece_to_id(t) == self.sp.unk_id()]
        if missing:
            raise TokenizerError(f"'{path.name}' is not a ChatGLM-6B tokenizer: it has no {missing[0]!r} piece; "
                                 f"use the ice_text.model of the checkpoint")
        self.special_tokens = {t: self.sp.piece_to_id(t) for t in V1_SPECIAL_TOKENS}
        self.id_to_special = {i: t for t, i in self.special_tokens.items()}
        self.pad_token_id = self.sp.piece_to_id("<pad>")
        self.unk_token_id = self.sp.unk_id()
        self.bos_token_id = self.special_tokens["<sop>"]
        self.eos_token_id = self.special_tokens["<eop>"]
        self.mask_token_id, self.gmask_token_id = self.special_tokens["[MASK]"], self.special_tokens["[gMASK]"]
        self.suffix_ids = [self.gmask_token_id, self.bos_token_id]
        self.prefix_ids: list[int] = []  # v1 puts nothing before the text
        self.stop_ids = [self.eos_token_id]
        self._skip = set(self.special_tokens.values()) | {self.pad_token_id, self.unk_token_id, 1, 2}

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> "ChatGLM1Tokenizer":
        return cls(Path(directory) / V1_VOCAB_FILE, **kwargs)

    def get_command(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        raise KeyError(f"{token!r} is not a special token of chatglm1")

    def tokenize(self, text: str) -> list[str]:
        return [self.sp.id_to_piece(i) for i in self.sp_encode(text)]

    def convert_tokens_to_ids(self, tokens):
        return self.sp.piece_to_id(tokens) if isinstance(tokens, str) else [self.sp.piece_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        return self.sp.id_to_piece(int(ids)) if isinstance(ids, int) else [self.sp.id_to_piece(int(i)) for i in ids]

    def sp_encode(self, text: str) -> list[int]:
        """Text ids after the v1 pre-processing (with the dummy "▁" prefix, no special tokens)."""
        return self.sp.encode(v1_preprocess(text)) if text else []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.sp_encode(text)
        return ids + self.suffix_ids if add_special_tokens else ids

    def build_inputs_with_special_tokens(self, ids_a: list[int], ids_b: list[int] | None = None) -> list[int]:
        """a + [gMASK] <sop> (+ b + <eop>), as the official tokenizer (the v1 training layout, spec §6)."""
        ids = [*ids_a, *self.suffix_ids]
        return ids if ids_b is None else [*ids, *ids_b, self.eos_token_id]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`: pad and special ids dropped, `<n>`/`<|tab|>`/`<|blank_k|>` turned back into whitespace."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        kept = [int(i) for i in ids if int(i) not in self._skip and 0 <= int(i) < self.sp_vocab_size]
        return v1_postprocess(self.sp.decode(kept)) if kept else ""

    def __call__(self, texts, return_tensors: str | None = None, padding: bool = True):
        """Encode one text or a batch, left-padded with `<pad>`; also returns the 2-D position_ids [2, n] per row
        (pads get 0, spec §4/§5.3)."""
        single = isinstance(texts, str)
        rows = [self.encode(t) for t in ([texts] if single else texts)]
        width = max(len(r) for r in rows) if padding else None
        batch = {"input_ids": [], "attention_mask": [], "position_ids": []}
        for r in rows:
            pad = (width - len(r)) if padding else 0
            context = r.index(self.bos_token_id)
            mask_position = r.index(self.gmask_token_id)
            positions = [i if i < context else mask_position for i in range(len(r))]
            blocks = [0 if i < context else i - context + 1 for i in range(len(r))]
            batch["input_ids"].append([self.pad_token_id] * pad + r)
            batch["attention_mask"].append([0] * pad + [1] * len(r))
            batch["position_ids"].append([[0] * pad + positions, [0] * pad + blocks])
        if return_tensors == "pt":
            if len({len(r) for r in batch["input_ids"]}) > 1:
                raise ValueError("rows of different lengths need padding=True to become one tensor")
            import torch

            return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        return {k: v[0] for k, v in batch.items()} if single else batch


def detect_family(directory: Path) -> str:
    """'chatglm3' when tokenizer_config.json names chatglm3 or has a role-token chat_template, else 'chatglm2'."""
    config_file = Path(directory) / "tokenizer_config.json"
    if not config_file.is_file():
        return "chatglm2"
    text = config_file.read_text(encoding="utf-8", errors="replace")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(
            f"'{config_file.name}' is not valid JSON (line {exc.lineno}); fix or delete it"
        ) from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if "chatglm3" in text.lower() or (isinstance(template, str) and "<|user|>" in template):
        return "chatglm3"
    return "chatglm2"


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns newly final text; `flush()` returns the rest.

    The deltas joined equal `tokenizer.decode(ids)` exactly, U+FFFD for invalid bytes included (as
    SentencePiece and the reference implementation show them). Only a UTF-8 sequence that is incomplete at
    the end of the ids so far, and could still become a character, is held back. An incremental UTF-8
    decoder fed the trailing byte-fallback pieces tells the two apart; the text itself always comes from
    SentencePiece, whose U+FFFD count (one per invalid byte) differs from Python's.
    Decodes only the window from the last stable offset, so the cost per token stays small; since both
    texts compared start at the same id, SentencePiece's leading-space stripping cancels out.
    """

    def __init__(self, tokenizer: ChatGLMTokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # ids before this are already emitted
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # the trailing byte pieces

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:stop], skip_special_tokens=self.skip_special_tokens)

    def _incomplete_tail(self, token_id: int) -> bool:
        """Whether the ids so far end in byte pieces that more bytes could still make into a character."""
        sp = self.tokenizer.sp
        if 2 < token_id < self.tokenizer.sp_vocab_size and sp.is_byte(token_id):
            self._utf8.decode(bytes([int(sp.id_to_piece(token_id)[3:5], 16)]))  # piece "<0xNN>"
        else:  # any other id ends the byte run (decode splits runs there too)
            self._utf8.reset()
        return bool(self._utf8.getstate()[0])

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        self.ids.append(token_id)
        if self._incomplete_tail(token_id):
            return ""
        done = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset)
        if len(full) <= len(done):
            return ""
        delta = full[len(done):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Whatever is still held back (a reply cut mid-character ends in U+FFFD, as in the full decode)."""
        done = self._decode(self._prefix_offset, self._read_offset)
        delta = self._decode(self._prefix_offset)[len(done):]
        self._prefix_offset = self._read_offset = len(self.ids)
        self._utf8.reset()
        self.text += delta
        return delta
