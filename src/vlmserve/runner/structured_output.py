"""Structured output: a GuidedDecodingSpec compiled into a token-level guide, and its state per request.

Backed by llguidance (Earley parser + lexer over the tokenizer's token trie; masks are computed lazily,
token by token, so compiling is milliseconds). The front end calls `validate_spec` in a worker thread,
so a schema, regex or grammar that does not compile is a 400 before the engine sees the request. The
runner calls `compile_guide(spec, info).new_state()` once per request (a cache hit after the front
end's check), `fill_mask` before sampling each token and `accept` after. Compiled guides are cached on
the model's `TokenizerInfo`, never in module state. Masks are built on the CPU; the runner moves them.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import llguidance
import llguidance.hf
import torch

from vlmserve.errors import InvalidRequestError
from vlmserve.protocol.types import GuidedDecodingSpec

# JSON output: "," and ":" with up to this much whitespace (spaces, newlines, indentation) around every
# JSON element: compact, json.dumps-style and pretty-printed JSON all pass, while a model that loops
# on whitespace (a known failure of "any whitespace" grammars) cannot stall a request.
JSON_WHITESPACE_PATTERN = r"[\x20\x0A\x0D\x09]{0,20}"
JSON_COMPILE_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": True,
    "whitespace_pattern": JSON_WHITESPACE_PATTERN,
}
DEFAULT_MAX_CACHED_GUIDES = 256
_MAX_ERROR_CHARS = 600
# llguidance's error messages quote the grammar it built ("   1 | start: /.../", then a caret line)
_ERROR_CONTEXT_LINE = re.compile(r"^\s*(\d+ \|.*|\^+)\s*$")
# "at 1(8): ": a position in that generated grammar, not in what the client sent
_ERROR_POSITION = re.compile(r"^at \d+\(\d+\): ")


class TokenizerInfo:
    """The model's tokenizer as the grammar engine needs it, built once per model (about a second),
    plus the LRU cache of compiled guides for this tokenizer (thread-safe: the front end's worker
    threads and the engine thread share it).

    vocab_size is the mask width: at least the tokenizer's length; ids past the tokenizer (padding
    rows of the model's embedding) are never allowed.
    """

    def __init__(
        self,
        ll_tokenizer: llguidance.LLTokenizer,
        eos_token_ids: tuple[int, ...],
        *,
        max_cached_guides: int = DEFAULT_MAX_CACHED_GUIDES,
    ) -> None:
        self.ll_tokenizer = ll_tokenizer
        self.vocab_size: int = ll_tokenizer.vocab_size
        self.eos_token_ids = eos_token_ids
        self.max_cached_guides = max_cached_guides
        self._guides: OrderedDict[GuidedDecodingSpec, CompiledGuide] = OrderedDict()
        self._lock = threading.Lock()

    def cached_guide(self, spec: GuidedDecodingSpec) -> CompiledGuide | None:
        with self._lock:
            guide = self._guides.get(spec)
            if guide is not None:
                self._guides.move_to_end(spec)
            return guide

    def cache_guide(self, guide: CompiledGuide) -> None:
        with self._lock:
            self._guides[guide.spec] = guide
            self._guides.move_to_end(guide.spec)
            while len(self._guides) > self.max_cached_guides:
                self._guides.popitem(last=False)


def build_tokenizer_info(
    tokenizer: Any,
    eos_token_ids: Iterable[int],
    vocab_size: int | None = None,
    *,
    max_cached_guides: int = DEFAULT_MAX_CACHED_GUIDES,
) -> TokenizerInfo:
    """TokenizerInfo from a Hugging Face fast tokenizer (the one `inputs/tokenizer.load_tokenizer`
    gives). eos_token_ids: every id that ends generation (the engine's set); a guide allows them
    exactly when its grammar can end. vocab_size: the model's logits width, when it is larger than
    the tokenizer (the extra ids are never allowed)."""
    eos = tuple(sorted(set(eos_token_ids)))
    if not eos:
        raise ValueError("structured output needs at least one eos token id")
    num_tokens = max(len(tokenizer), vocab_size or 0)
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=num_tokens, eos_token=list(eos))
    return TokenizerInfo(ll_tokenizer, eos, max_cached_guides=max_cached_guides)


class CompiledGuide:
    """A spec compiled for one tokenizer: a matcher in its start state that `new_state` copies (a
    copy costs about a microsecond; compiling costs milliseconds). Immutable once built."""

    def __init__(self, spec: GuidedDecodingSpec, info: TokenizerInfo, matcher: llguidance.LLMatcher) -> None:
        self.spec = spec
        self.info = info
        self._matcher = matcher

    def new_state(self) -> GuideState:
        return GuideState(self._matcher.deep_copy(), self.info)


class GuideState:
    """One request's position in its guide. Not thread-safe: it lives on the engine thread.

    Per sampled token: `fill_mask` (or `allowed_mask`) before sampling, then `accept(token_id)`.
    `is_terminated()`: the grammar is complete and nothing but eos may follow (or eos was accepted):
    the request is finished. After a rejected token the state is in error for good (`error` says
    why) and its mask allows only eos.
    """

    def __init__(self, matcher: llguidance.LLMatcher, info: TokenizerInfo) -> None:
        self._matcher = matcher
        self._info = info
        self._scratch = torch.empty(_num_words(info.vocab_size), dtype=torch.int32)
        self._error: str | None = None

    def fill_mask(self, out: torch.Tensor) -> None:
        """Writes the allowed next tokens into `out`, a contiguous CPU tensor that is either one row of
        a packed bitmask (int32 [>= ceil(vocab_size / 32)], bit i of word i // 32 is token i, as
        `allocate_bitmask` makes) or a bool row [logits width] (padded with False, or cut)."""
        if out.dtype == torch.int32:
            if out.device.type != "cpu" or not out.is_contiguous() or out.numel() < self._scratch.numel():
                raise ValueError(
                    f"a bitmask row must be a contiguous CPU int32 tensor of >= {self._scratch.numel()} words"
                )
            out[self._scratch.numel() :] = 0
            self._matcher.unsafe_compute_mask_ptr(out.data_ptr(), self._scratch.numel() * 4)
        elif out.dtype == torch.bool:
            out.copy_(self.allowed_mask(out.shape[-1]))
        else:
            raise ValueError(f"fill_mask takes an int32 bitmask row or a bool row, not {out.dtype}")

    def allowed_mask(self, vocab_size: int) -> torch.Tensor:
        """The allowed next tokens as a bool tensor [vocab_size] (the logits width) on the CPU."""
        self._matcher.unsafe_compute_mask_ptr(self._scratch.data_ptr(), self._scratch.numel() * 4)
        return unpack_bitmask(self._scratch.unsqueeze(0), vocab_size)[0]

    def accept(self, token_id: int) -> bool:
        """Advances past the sampled token; False when the guide does not allow it (then `error`)."""
        if not 0 <= token_id < self._info.vocab_size:
            # an id no mask allows: only a bug gets here
            self._error = f"token id {token_id} is outside the guide's vocabulary of {self._info.vocab_size}"
            return False
        return bool(self._matcher.consume_token(token_id))

    def is_terminated(self) -> bool:
        return self._error is None and bool(self._matcher.is_stopped()) and not self._matcher.is_error()

    @property
    def error(self) -> str | None:
        """Why the guide failed (a token it does not allow, a grammar too complex to go on), else None."""
        if self._error is not None:
            return self._error
        message = self._matcher.get_error()
        return _short_error(message) if message else None


def compile_guide(spec: GuidedDecodingSpec, info: TokenizerInfo) -> CompiledGuide:
    """The compiled guide of `spec`, from the cache on `info` or built (milliseconds; seconds only for
    huge grammars: call it off the event loop). InvalidRequestError (400, param = spec.param) when
    the schema, regex or grammar is invalid or uses what the engine does not support."""
    guide = info.cached_guide(spec)
    if guide is not None:
        return guide
    param = spec.param
    try:
        grammar = _llguidance_grammar(spec)
        matcher = llguidance.LLMatcher(info.ll_tokenizer, grammar, log_level=0)
    except (ValueError, TypeError) as e:  # UnicodeEncodeError (lone surrogates) is a ValueError
        raise InvalidRequestError(
            f"{_field(spec)} cannot be used: {_short_error(str(e))}", param=param
        ) from e
    if matcher.is_error():
        message = _short_error(matcher.get_error())
        raise InvalidRequestError(f"{_field(spec)} cannot be used: {message}", param=param)
    guide = CompiledGuide(spec, info, matcher)
    info.cache_guide(guide)
    return guide


def validate_spec(spec: GuidedDecodingSpec, info: TokenizerInfo) -> None:
    """Raises InvalidRequestError (400) when `spec` does not compile; the compiled guide stays cached
    for the engine. Blocking (compiles): run it in a worker thread."""
    compile_guide(spec, info)


def allocate_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """A packed bitmask for `batch_size` rows: int32 [batch_size, ceil(vocab_size / 32)], all allowed
    (rows of unguided requests stay so). Pinned when CUDA is there, for a non-blocking copy."""
    return torch.full(
        (batch_size, _num_words(vocab_size)), -1, dtype=torch.int32, pin_memory=torch.cuda.is_available()
    )


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bitmask int32 [N, W] (any device) -> bool [N, vocab_size]: True where allowed; columns past
    32 * W are False."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)  # [N, 32 * W]
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    padding = torch.zeros(
        allowed.shape[0], vocab_size - allowed.shape[1], dtype=torch.bool, device=allowed.device
    )
    return torch.cat([allowed, padding], dim=1)


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Sets the disallowed logits to -inf in place. logits [N, V] float; bitmask int32 [N, W] on the
    logits' device. Returns logits."""
    return logits.masked_fill_(~unpack_bitmask(bitmask, logits.shape[-1]), float("-inf"))


# --- spec -> llguidance grammar ---------------------------------------------------------------------


def _llguidance_grammar(spec: GuidedDecodingSpec) -> str:
    value = spec.value
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "object"}, defaults=JSON_COMPILE_OPTIONS
        )
    if spec.kind == "choice":
        if not isinstance(value, tuple):
            raise TypeError("a choice spec's value is a tuple of strings")
        # Lark string literals take JSON escapes
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    if not isinstance(value, str):
        raise TypeError(f"a {spec.kind} spec's value is a string")
    if spec.kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_COMPILE_OPTIONS)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    # Lark (llguidance's dialect) as is; anything else is taken as GBNF and converted
    return llguidance.grammar_from("grammar", value)


def _field(spec: GuidedDecodingSpec) -> str:
    what = {
        "json": "JSON schema",
        "json_object": "JSON grammar",
        "regex": "regular expression",
        "choice": "choice list",
        "grammar": "grammar",
    }[spec.kind]
    return f"{spec.param} ({what})" if spec.param else f"the {what}"


def _short_error(message: str) -> str:
    """llguidance's message without its dump of the parser state and its quotes of the generated
    grammar, on one line, cut short."""
    message = message.split("<state>", 1)[0]
    text = " ".join(
        line.strip() for line in message.splitlines() if line.strip() and not _ERROR_CONTEXT_LINE.match(line)
    )
    text = _ERROR_POSITION.sub("", text)
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _num_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32
