"""Decoding many token-id lists at once, with exactly the text `chat._decode(..., skip_special_tokens=True)` gives.

`ByteTable` serves tokenizers whose decoder is the byte-level one (GPT-2, Qwen, Llama 3): that decoder maps each
token's characters back to bytes (a token with a character outside the byte alphabet keeps its own UTF-8 bytes),
joins the bytes of all tokens and reads them as UTF-8, lossily. So a response is the concatenation of per-id byte
strings, gathered in numpy for a whole block. Only strict UTF-8 results are used (where lossy and strict agree);
every id's bytes are checked against the tokenizer's own decoding of that id when the table is made, and rows with
an id that disagrees, or whose bytes are not valid UTF-8, are decoded by the tokenizer (`decode_many`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from nemo_automodel_dspark.data.chat import _decode


def _byte_alphabet() -> dict[str, int]:
    """The byte-level alphabet, character -> byte: printable bytes stand for themselves, the others for 256 + k."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: b for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    return {chr(c): b for b, c in chars.items()}


def _plain_backend(tokenizer: Any) -> Any:
    """The `tokenizers` object behind a transformers fast tokenizer whose `_decode` is nothing but that object's
    `decode` (no clean-up of spaces, not overridden); None otherwise."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(tokenizer)._decode is not TokenizersBackend._decode:
        return None
    return None if getattr(tokenizer, "clean_up_tokenization_spaces", False) else backend


def decode_many(tokenizer: Any, responses: list[np.ndarray]) -> list[str]:
    """Each id list decoded with special tokens skipped: by `decode_batch` (Rust threads) when `_decode` is just the
    backend's `decode`, else one `_decode` call each."""
    lists = [r.tolist() for r in responses]
    backend = _plain_backend(tokenizer)
    if backend is not None:
        return backend.decode_batch(lists, skip_special_tokens=True)
    return [_decode(tokenizer, ids, skip_special_tokens=True) for ids in lists]


class ByteTable:
    """Every id's bytes (none for a special token, which decoding skips), flat; `unsafe` marks ids whose bytes
    disagree with the tokenizer's own decoding of that id alone."""

    def __init__(self, data: np.ndarray, starts: np.ndarray, unsafe: np.ndarray) -> None:
        self.data = data  # [B] uint8: the ids' bytes back to back
        self.starts = starts[:-1]  # [V] int64: id i's bytes are data[starts[i] : starts[i] + lengths[i]]
        self.lengths = np.diff(starts)  # [V] int64
        self.unsafe = unsafe  # [V] bool

    @classmethod
    def of(cls, tokenizer: Any) -> ByteTable | None:
        """The table of a tokenizer with a plain byte-level decoder; None for any other tokenizer."""
        from tokenizers import decoders

        backend = _plain_backend(tokenizer)
        if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
            return None
        alphabet, vocab = _byte_alphabet(), len(tokenizer)
        to_bytes = str.maketrans({c: chr(b) for c, b in alphabet.items()})  # then latin-1: one char, one byte
        outside = str.maketrans(dict.fromkeys(alphabet))  # deletes the alphabet: what is left is outside it
        special = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
        pieces = []
        for i in range(vocab):
            token = backend.id_to_token(i)
            if token is None or i in special:
                pieces.append(b"")
            elif not token.translate(outside):
                pieces.append(token.translate(to_bytes).encode("latin-1"))
            else:  # a character outside the alphabet: the decoder keeps the token's own UTF-8 bytes
                pieces.append(token.encode())
        singles = backend.decode_batch([[i] for i in range(vocab)], skip_special_tokens=True)
        unsafe = np.asarray([p.decode("utf-8", "replace") != s for p, s in zip(pieces, singles, strict=True)])
        starts = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
        return cls(np.frombuffer(b"".join(pieces), np.uint8), starts, unsafe.astype(bool))

    def texts(self, responses: list[np.ndarray]) -> list[str | None]:
        """Each id list's text; None where a list is empty, an id is unsafe or the bytes are not strict UTF-8 (the
        caller decodes those rows by the tokenizer). Ids must be in [0, V)."""
        out: list[str | None] = [None] * len(responses)
        rows = [i for i, r in enumerate(responses) if len(r)]
        if not rows:
            return out
        ids = np.concatenate([responses[i] for i in rows])  # [T]
        counts = np.asarray([len(responses[i]) for i in rows], np.int64)
        lengths = self.lengths[ids]  # [T] bytes per token
        ends = np.cumsum(lengths)  # [T] end of each token's bytes in the output
        index = np.repeat(self.starts[ids] - (ends - lengths), lengths) + np.arange(int(ends[-1]))
        data = self.data[index].tobytes()
        last = np.cumsum(counts) - 1  # [rows] each row's last token
        unsafe = np.zeros(len(rows), bool)
        if self.unsafe.any():
            unsafe = np.add.reduceat(self.unsafe[ids].astype(np.int64), last - counts + 1) > 0
        begin = 0
        for i, end, bad in zip(rows, ends[last].tolist(), unsafe.tolist(), strict=True):
            with contextlib.suppress(UnicodeDecodeError):  # not strict UTF-8: left to the tokenizer
                out[i] = None if bad else data[begin:end].decode("utf-8")
            begin = end
        return out
