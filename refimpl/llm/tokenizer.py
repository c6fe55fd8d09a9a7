"""SmolLM2's tokenizer, rebuilt from the GGUF metadata with the ``tokenizers`` library.

The file stores a GPT-2-style byte-level BPE (Sennrich et al. 2016; Radford et al. 2019): the vocabulary
(``tokenizer.ggml.tokens``, byte-level strings such as ``"Ġthe"``), the ranked merges
(``tokenizer.ggml.merges``, ``"Ġ t"``) and the token types (3 = control token such as ``<|im_start|>``).
Its pre-tokenizer is named ``smollm``: llama.cpp splits every digit on its own, then applies the GPT-2
regular expression. We build the same pipeline: ``Digits(individual_digits=True)`` then ``ByteLevel``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from refimpl._checks import check_int

__all__ = ["Tokenizer"]

CONTROL = 3  # llama.cpp token type of control (special) tokens


class Tokenizer:
    """Byte-level BPE tokenizer: ``encode(text) -> list[int]``, ``decode(ids) -> str``.

    Build it with :meth:`from_gguf_data` (the dict of :func:`refimpl.llm.gguf_file.read_tokenizer_data`).
    Control tokens (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, ...) are matched as whole tokens in
    the input text and dropped by ``decode(..., skip_special=True)``.
    """

    def __init__(self, backend: Any, bos_id: int, eos_id: int, stop_ids: Sequence[int], special_ids: set[int]):
        self._tok = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.stop_ids = tuple(stop_ids)
        self.special_ids = frozenset(special_ids)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_gguf_data(cls, data: dict[str, Any]) -> Tokenizer:
        """Build the tokenizer from the GGUF tokenizer arrays (``tokens``, ``merges``, ``token_types``)."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        if data["model"] != "gpt2":
            raise ValueError(f"tokenizer.ggml.model must be 'gpt2' (byte-level BPE), got {data['model']!r}")
        tokens: list[str] = data["tokens"]
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in data["merges"]]
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        special = {i for i, t in enumerate(data["token_types"]) if t == CONTROL}
        tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)])
        eos = int(data["eos_id"])
        # The instruct model ends a turn with <|im_end|> (the file's eos); the base model's documents end with
        # <|endoftext|>. Generation stops at either.
        stop = [eos] + [vocab[t] for t in ("<|endoftext|>",) if t in vocab and vocab[t] != eos]
        return cls(tok, int(data["bos_id"]), eos, stop, special)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS is added: the file says ``add_bos_token = false``)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids``; raises ``ValueError`` for an id outside ``[0, vocab_size)``."""
        ids = [int(i) for i in ids]
        for i in ids:
            check_int("token id", i, min_value=0, max_value=self.vocab_size - 1)
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def token(self, i: int) -> str:
        """The vocabulary string of id ``i`` (byte-level form, e.g. ``"Ġthe"``)."""
        check_int("token id", i, min_value=0, max_value=self.vocab_size - 1)
        return self._tok.id_to_token(i)

    def chat_prompt(self, user_message: str, system: str | None = None) -> str:
        """The ChatML prompt of the file's chat template for one user turn, ending where the assistant
        speaks (the template's default system message is used when ``system`` is None)."""
        system = system or "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
        return (
            f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user_message}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"
