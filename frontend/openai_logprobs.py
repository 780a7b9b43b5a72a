"""Log-probabilities in OpenAI's shapes: completions' `{tokens, token_logprobs, top_logprobs, text_offset}`
and chat's `{content: [{token, logprob, bytes, top_logprobs}]}`, with each token's own string and bytes.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer

from ipc.messages import TokenLogprobs


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenText:
    """Each token's own string (the id decoded alone, as OpenAI shows tokens) and exact bytes; cached
    per request, decoded in one batch."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.strings: dict[int, str] = {}
        self.byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"
        self.special = (
            {token.content for token in tokenizer.get_added_tokens_decoder().values()}
            if hasattr(tokenizer, "get_added_tokens_decoder")
            else set()
        )

    def load(self, ids) -> None:
        missing = sorted({t for t in ids if t not in self.strings})
        if missing:
            decoded = self.tokenizer.decode_batch([[t] for t in missing], skip_special_tokens=False)
            self.strings.update(zip(missing, decoded))

    def string(self, token_id: int) -> str:
        return self.strings[token_id]

    def bytes(self, token_id: int) -> list[int]:
        """The token's own bytes (a piece of a multi-byte character included), not its lossy string."""
        if self.byte_level:
            piece = self.tokenizer.id_to_token(token_id)
            table = _byte_decoder()
            if piece is not None and piece not in self.special and all(ch in table for ch in piece):
                return [table[ch] for ch in piece]
        return list(self.strings[token_id].encode("utf-8"))


def _ids_of(entries: list[TokenLogprobs | None], ids: list[int]) -> list[int]:
    needed = list(ids)
    for entry in entries:
        if entry is not None:
            needed += entry.top_ids
    return needed


def completion_logprobs(
    text: TokenText, ids: list[int], entries: list[TokenLogprobs | None], offset: int
) -> tuple[dict, int]:
    """OpenAI's completions `logprobs` for tokens `ids` (an entry of None: the prompt's first token,
    which has none), text offsets counted from `offset`; returns it and the offset after."""
    text.load(_ids_of(entries, ids))
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entry in zip(ids, entries):
        token = text.string(token_id)
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(entry.logprob)
        # as OpenAI: the top k, and the sampled token's own logprob too (so up to k + 1 entries)
        top = {text.string(t): lp for t, lp in zip(entry.top_ids, entry.top_logprobs)}
        top.setdefault(token, entry.logprob)
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }, offset


def chat_logprobs(text: TokenText, entries: list[TokenLogprobs]) -> dict:
    """OpenAI's chat `logprobs`: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""
    text.load(_ids_of(entries, [entry.token_id for entry in entries]))

    def one(token_id: int, logprob: float) -> dict:
        return {"token": text.string(token_id), "logprob": logprob, "bytes": text.bytes(token_id)}

    return {
        "content": [
            {
                **one(entry.token_id, entry.logprob),
                "top_logprobs": [one(t, lp) for t, lp in zip(entry.top_ids, entry.top_logprobs)],
            }
            for entry in entries
        ]
    }
