"""A character-level tokenizer for the built-in tasks (no download, no external files).

Ids 0, 1, 2 are ``<pad>``, ``<bos>``, ``<eos>``; then one id per character of :data:`ALPHABET`. The interface
(``encode``, ``decode``, ``pad_token_id``, ``bos_token_id``, ``eos_token_id``, ``vocab_size``) is the subset
of a Hugging Face tokenizer that the trainer uses, so HF tokenizers plug into the same code paths.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["ALPHABET", "SPECIAL_TOKENS", "CharTokenizer"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")
ALPHABET: str = "0123456789+-*=:,;>?| " + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class CharTokenizer:
    """Maps each character of ``alphabet`` to one id (after the three special tokens).

    >>> tok = CharTokenizer()
    >>> tok.decode(tok.encode("12+3="))
    '12+3='
    """

    def __init__(self, alphabet: str = ALPHABET) -> None:
        if not isinstance(alphabet, str) or not alphabet:
            raise TypeError("alphabet: expected a non-empty str")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet: characters must be unique")
        self.alphabet = alphabet
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self._id = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.alphabet)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Ids of ``text`` (optionally preceded by ``<bos>``); unknown characters raise ``ValueError``."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        try:
            ids = [self._id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"text: character {e.args[0]!r} is not in the tokenizer alphabet") from None
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; decoding stops at the first ``<eos>`` when ``skip_special_tokens``."""
        out = []
        n = len(SPECIAL_TOKENS)
        for i in ids:
            i = int(i)
            if i < n:
                if skip_special_tokens:
                    if i == self.eos_token_id:
                        break
                    continue
                out.append(SPECIAL_TOKENS[i])
            elif i - n < len(self.alphabet):
                out.append(self.alphabet[i - n])
            else:
                raise ValueError(f"ids: id {i} is outside the vocabulary of size {self.vocab_size}")
        return "".join(out)

    def save(self, directory: str | Path) -> None:
        Path(directory, "char_tokenizer.json").write_text(json.dumps({"alphabet": self.alphabet}))

    @classmethod
    def load(cls, directory: str | Path) -> CharTokenizer:
        return cls(json.loads(Path(directory, "char_tokenizer.json").read_text())["alphabet"])
