"""Prompt tokenization that never stalls the event loop, and refuses oversized prompts before any work.

No token covers more characters than the longest entry of the vocabulary, so a prompt longer than
context window × that length (doubled, for normalizers that shrink text) cannot fit: it is refused
from its length alone, before tokenizing, whose time and memory grow with the text. Prompts that
pass are tokenized in a thread with `encode_batch`, which releases the GIL (plain `encode` may
hold it), so the loop keeps streaming everybody else's tokens meanwhile.

A chat prompt comes in pieces (see `ChatTemplate.render_pieces`): the template's text is encoded with
its special tokens recognized, the messages' contents with a twin tokenizer that encodes special-token
text as plain text, so a user cannot type a control token.
"""

from __future__ import annotations

import asyncio
import itertools

from tokenizers import Tokenizer

from frontend.api import ApiError
from frontend.chat_template import PromptPiece

INLINE_CHARS = 4096  # shorter prompts tokenize in well under a millisecond: not worth a thread hop
NORMALIZER_SLACK = 2


class PromptEncoder:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.literal = Tokenizer.from_str(tokenizer.to_str())
        self.literal.encode_special_tokens = True  # `<|im_start|>` in client text → ordinary tokens
        self.max_token_chars = max(map(len, tokenizer.get_vocab(with_added_tokens=True)), default=1)

    def char_limit(self, context: int) -> int:
        """More characters than this cannot encode to fewer than `context` tokens."""
        return context * self.max_token_chars * NORMALIZER_SLACK

    def check_length(self, text: str, context: int, field: str = "prompt") -> None:
        limit = self.char_limit(context)
        if len(text) > limit:
            raise ApiError(
                400,
                f"{field} is {len(text)} characters; the context window is {context} tokens, "
                f"which no text over {limit} characters fits with this tokenizer",
                field,
            )

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) < INLINE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        (encoding,) = await asyncio.to_thread(
            self.tokenizer.encode_batch, [text], add_special_tokens=add_special_tokens
        )
        return encoding.ids

    async def encode_pieces(self, pieces: list[PromptPiece]) -> list[int]:
        """Template text with special tokens recognized, client text without; no BOS is added
        (a chat template writes its own)."""
        template = [piece.text for piece in pieces if not piece.from_client]
        client = [piece.text for piece in pieces if piece.from_client]
        if sum(map(len, client)) < INLINE_CHARS:
            encoded = self._encode_both(template, client)
        else:
            encoded = await asyncio.to_thread(self._encode_both, template, client)
        template_ids, client_ids = iter(encoded[0]), iter(encoded[1])
        return list(
            itertools.chain.from_iterable(
                next(client_ids if piece.from_client else template_ids).ids for piece in pieces
            )
        )

    def _encode_both(self, template: list[str], client: list[str]):
        return (
            self.tokenizer.encode_batch(template, add_special_tokens=False),
            self.literal.encode_batch(client, add_special_tokens=False),
        )
