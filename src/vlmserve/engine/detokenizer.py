"""Incremental detokenization and stop strings, per request, on the asyncio side of the engine.

`IncrementalDetokenizer` turns token deltas into text deltas that never end in a broken UTF-8
character (a byte-level BPE token can hold part of a character). `StopStringMatcher` finds stop
strings across token boundaries and holds back text that might be the start of one, so nothing
past a stop string is ever streamed.
"""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded with the first outputs, so that a leading space or merge is rendered as
# the tokenizer would in context (vLLM keeps the same small window).
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing list of token ids, returning only the new, complete text each time."""

    def __init__(
        self, tokenizer: Any, prompt_token_ids: list[int], *, skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        # text is emitted for tokens [read_offset:], decoded in the context of [prefix_offset:read_offset]
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)

    def push(self, new_token_ids: list[int]) -> str:
        self.token_ids.extend(new_token_ids)
        decode = self.tokenizer.decode
        prefix_text = decode(
            self.token_ids[self.prefix_offset : self.read_offset],
            skip_special_tokens=self.skip_special_tokens,
        )
        full_text = decode(self.token_ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            # nothing new, or a character still incomplete: wait for the next token
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]


class StopStringMatcher:
    """Accumulates text; releases what can no longer be part of a stop string."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.num_released = 0
        self.matched: str | None = None

    def push(self, delta: str) -> str:
        """Adds text and returns the part that is safe to emit; after a match, the text up to it."""
        if self.matched is not None:
            return ""
        search_from = max(0, len(self.text) - self.holdback)
        self.text += delta
        if self.stop:
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                index, self.matched = min(hits)
                self.text = self.text[:index]
                return self._release(len(self.text))
        return self._release(max(self.num_released, len(self.text) - self.holdback))

    def flush(self) -> str:
        """Everything held back, at the end of a request that did not hit a stop string."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out = self.text[self.num_released : upto]
        self.num_released = max(self.num_released, upto)
        return out
