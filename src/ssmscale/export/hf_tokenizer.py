"""The tokenizer of an exported run, as files `transformers.AutoTokenizer.from_pretrained(folder)` loads.

Both of our tokenizers are byte-level BPEs in HF `tokenizers` terms: the BPE is one already (its
tokenizer.json is written as is but for the separator, below); the byte tokenizer is a BPE with no
merges whose vocabulary maps the printable character of byte b (BYTE_CHARS) to id b, with the
byte-level pre-tokenizer and decoder, so every byte is one token and its id is the byte's value.

The separator (the NUL byte, which ends every document in training) becomes the special token that
transformers and lm-evaluation-harness use as BOS, EOS and padding. Declaring the vocabulary's own
NUL token ('Ā', the byte-level character of byte 0) special would make transformers read the letter
U+0100 in text as the separator; instead the NUL entry of the vocabulary is renamed to the NUL
character itself and that is the special token: it matches a NUL byte in the raw text, which our
tokenizers encode to the same id, and nothing else. This is exact for any text with the byte
tokenizer (no merges); with a BPE it is exact for any text where no merge involves the NUL byte
(refused otherwise: NUL never appears in training text, so a BPE learns no such merge), with one
exception: a NUL byte followed by an English contraction ('s, 't, 're, 've, 'm, 'll, 'd), which the
byte-level pre-tokenizer groups with the NUL in ours but on its own in theirs.
"""

from __future__ import annotations

import json

from ..data.tokenizer import BYTE_CHARS, BPETokenizer, ByteTokenizer
from ..errors import UserError

NUL = "\x00"


def _byte_level_bpe_json() -> dict:
    """The byte tokenizer as a tokenizers BPE with no merges (JSON form)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(BYTE_CHARS)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return json.loads(tok.to_str())


def _merge_pieces(merge) -> list[str]:
    return merge.split(" ") if isinstance(merge, str) else list(merge)


def _with_separator_token(spec: dict, separator_id: int, label: str) -> dict:
    """`spec` (a BPE's tokenizer.json) with its NUL token renamed NUL and declared special (module docstring)."""
    model = spec.get("model") or {}
    vocab = model.get("vocab")
    nul_char = BYTE_CHARS[0]
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or vocab.get(nul_char) != separator_id:
        raise UserError(f"{label}: not a byte-level BPE whose NUL token is the separator id {separator_id}")
    if any(nul_char in piece for merge in model.get("merges") or [] for piece in _merge_pieces(merge)):
        raise UserError(f"{label}: the BPE has merges with the NUL byte (the document separator), so no "
                        "Hugging Face special token can stand for it without changing how text encodes")
    if spec.get("added_tokens"):
        raise UserError(f"{label}: the BPE already has added tokens; ssmscale's BPEs have none")
    vocab[NUL] = vocab.pop(nul_char)
    spec["added_tokens"] = [{"id": separator_id, "content": NUL, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}]
    return spec


def hf_tokenizer(tokenizer: ByteTokenizer | BPETokenizer, model_max_length: int):
    """A transformers fast tokenizer equal to ours (module docstring); save_pretrained writes its files.

    model_max_length: the run's training length, which lm-evaluation-harness takes as the context
    length for models whose config names none (Mamba, Mamba-2)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    if isinstance(tokenizer, ByteTokenizer):
        spec, label = _byte_level_bpe_json(), "byte tokenizer"
    else:
        try:
            spec = json.loads(tokenizer.text)     # the bytes load_bpe read, checked and hashed
        except ValueError as exc:
            raise UserError(f"{tokenizer.path}: unreadable BPE tokenizer ({exc})") from None
        label = str(tokenizer.path)
    backend = Tokenizer.from_str(json.dumps(_with_separator_token(spec, tokenizer.separator_id, label)))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=NUL, eos_token=NUL, pad_token=NUL,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)
