"""One request's state from its prefill to its last token: the tokens so far, the text released
so far, its timings, and the Answer it ends with. The same object is stepped alone
(`Engine.generate`) or beside others in a batch (`blend.scheduler`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from blend.prefill import PrefillResult
from blend.prompt import Layout
from blend.spec import Mode, QuerySpec, Sampling


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    mode: str
    ratio: float | None
    ttft_ms: float
    kv_load_ms: float
    prefill_ms: float
    per_token_ms: float
    recomputed_tokens: int    # chunk tokens computed fresh through every layer
    total_tokens: int         # prompt tokens
    chunk_tokens: int
    first_logits: torch.Tensor = field(repr=False)
    cached_tokens: int = 0    # prompt tokens whose KV was reused (prefix and chunks), not recomputed
    selection: str | None = None          # blend: how tokens were chosen
    finish_reason: str = "stop"           # "stop" (a stop token), "length" (max_tokens), "cancelled"

    def top_logprobs(self, tokenizer, k: int = 20) -> list[dict]:
        logp = torch.log_softmax(self.first_logits, dim=-1)
        top = torch.topk(logp, k)
        return [{"token_id": int(i), "token": tokenizer.decode([int(i)]) if tokenizer else str(int(i)),
                 "logprob": float(v)} for v, i in zip(top.values, top.indices)]


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from one row of logits: greedy, or sampled (temperature, top-p)."""
    if sampling.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest head of the distribution whose mass reaches top_p
        drop = sorted_p.cumsum(0) - sorted_p >= sampling.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class SeqState:
    """Created once the prompt is prefilled; `push(token)` for every token picked after that."""

    def __init__(self, layout: Layout, spec: QuerySpec, result: PrefillResult, tokenizer,
                 stop_ids: frozenset[int], t0: float, t_loaded: float):
        self.layout, self.spec, self.result = layout, spec, result
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.t0, self.t_loaded = t0, t_loaded
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.slot: int | None = None  # in a KVSlots, while decoding
        seed = spec.sampling.seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        """Where the next fed token goes: after the prompt and the tokens fed so far."""
        return self.layout.n_tokens + len(self.tokens) - 1

    def first(self) -> str:
        """Pick the first token from the prefill's logits; returns the text it releases."""
        return self.push(pick(self.result.logits, self.spec.sampling, self.generator))

    def push(self, token: int) -> str:
        """Take one picked token; returns the new text it releases ('' if none). Ends the sequence
        at a stop token (not kept) or at max_tokens."""
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if token in self.stop_ids:
            self.finish("stop")
            return self._flush()
        self.tokens.append(token)
        piece = ""
        if self.tokenizer is not None:
            new_text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            if not new_text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                piece, self.text = new_text[len(self.text):], new_text
        if len(self.tokens) >= self.spec.max_tokens:
            self.finish("length")
            piece += self._flush()
        return piece

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.t_end = time.perf_counter()

    def _flush(self) -> str:
        """A piece held back (an unfinished character) at the end."""
        if self.tokenizer is None:
            return ""
        final = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        piece = final[len(self.text):] if final.startswith(self.text) else ""
        self.text = final
        return piece

    def answer(self) -> Answer:
        result, spec, layout = self.result, self.spec, self.layout
        t_end = self.t_end or time.perf_counter()
        t_first = self.t_first or t_end
        sel = result.selected if spec.mode is Mode.BLEND else None
        blend = spec.blend
        return Answer(
            text=self.text, token_ids=list(self.tokens), mode=spec.mode.value,
            ratio=sel.ratio if sel is not None else None,
            ttft_ms=(t_first - self.t0) * 1e3, kv_load_ms=(self.t_loaded - self.t0) * 1e3,
            prefill_ms=(t_first - self.t_loaded) * 1e3,
            per_token_ms=(t_end - t_first) * 1e3 / max(1, len(self.tokens) - 1),
            recomputed_tokens=result.recomputed_tokens, total_tokens=layout.n_tokens,
            chunk_tokens=layout.n_chunk_tokens, first_logits=result.logits.cpu(),
            cached_tokens=0 if spec.mode is Mode.FULL else layout.suffix_start - result.recomputed_tokens,
            selection=blend.selection if sel is not None else None,
            finish_reason=self.finish_reason or "cancelled")
