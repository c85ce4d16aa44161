"""One request's state from its prefill to its last token: the tokens so far, the text released
so far, its timings, and the Answer it ends with. The same object is stepped alone
(`Engine.generate`) or beside others in a batch (`blend.scheduler`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from blend.penalties import penalize, token_counts
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
    requested_ratio: float | None = None  # blend: the ratio asked for (`ratio` is the one used)

    @property
    def ratio_raised(self) -> bool:
        """The loading controller recomputed more than asked (blend/loading.py)."""
        return self.ratio is not None and self.requested_ratio is not None and self.ratio > self.requested_ratio

    def top_logprobs(self, tokenizer, k: int = 20) -> list[dict]:
        logp = torch.log_softmax(self.first_logits, dim=-1)
        top = torch.topk(logp, k)
        return [{"token_id": int(i), "token": tokenizer.decode([int(i)]) if tokenizer else str(int(i)),
                 "logprob": float(v)} for v, i in zip(top.values, top.indices)]


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from one row of logits: greedy, or sampled (temperature, top-p)."""
    if sampling.temperature == 0.0:
        return int(logits.argmax())
    logits = logits.float()
    # shifted so the largest is 0: dividing by the temperature can then only underflow, never overflow
    probs = torch.softmax((logits - logits.max()) / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest head of the distribution whose mass reaches top_p (the top token always)
        drop = sorted_p.cumsum(0) - sorted_p >= sampling.top_p
        drop[0] = False
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def penalized(logits: torch.Tensor, seqs: dict[int, SeqState]) -> torch.Tensor:
    """`logits` [B, vocab] (row → sequence in `seqs`) with each sequence's penalties applied to its
    row, in one batched call; the same tensor when no sequence asks for any."""
    rows = [r for r, s in seqs.items() if s.spec.sampling.penalized]
    if not rows:
        return logits
    vocab, device = logits.shape[-1], logits.device
    chosen = [seqs[r] for r in rows]
    samp = [s.spec.sampling for s in chosen]
    values = torch.tensor([[p.frequency_penalty, p.presence_penalty, p.repetition_penalty] for p in samp],
                          dtype=torch.float32, device=device)
    prompt = (torch.stack([s.prompt_seen(vocab, device) for s in chosen])
              if any(p.repetition_penalty != 1.0 for p in samp) else None)
    index = torch.tensor(rows, device=device)
    out = logits.clone()
    out[index] = penalize(logits[index], token_counts([s.tokens for s in chosen], vocab, device),
                          values[:, 0], values[:, 1], values[:, 2], prompt)
    return out


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
        # Incremental detokenization (as vLLM's): only the tokens since `_prefix` are decoded per
        # token, so a step's host work does not grow with the answer's length (decoding every
        # answer whole each step costs milliseconds at a batch of hundreds). Text starts being
        # read at `_read`; the tokens from `_prefix` to it give the context that keeps word
        # boundaries (a SentencePiece leading space) right.
        self._prefix = self._read = 0
        self.finish_reason: str | None = None
        self.slot: int | None = None  # in a KVSlots, while decoding
        self._prompt_seen: torch.Tensor | None = None
        seed = spec.sampling.seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        """Where the next fed token goes: after the prompt and the tokens fed so far."""
        return self.layout.n_tokens + len(self.tokens) - 1

    def prompt_seen(self, vocab: int, device: torch.device) -> torch.Tensor:
        """[vocab] bool: the prompt's tokens (what `repetition_penalty` reads besides the answer)."""
        if self._prompt_seen is None:
            ids = torch.tensor(self.layout.ids(), dtype=torch.long, device=device)
            self._prompt_seen = torch.zeros(vocab, dtype=torch.bool, device=device).index_fill_(0, ids, True)
        return self._prompt_seen

    def first(self) -> str:
        """Pick the first token from the prefill's logits; returns the text it releases."""
        logits = self.result.logits.reshape(1, -1)
        return self.push(pick(penalized(logits, {0: self})[0], self.spec.sampling, self.generator))

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
            piece = self._new_text()
        if len(self.tokens) >= self.spec.max_tokens:
            self.finish("length")
            piece += self._flush()
        return piece

    def _new_text(self) -> str:
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix:self._read], skip_special_tokens=True)
        now = decode(self.tokens[self._prefix:], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return ""
        piece = now[len(before):]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += piece
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
            finish_reason=self.finish_reason or "cancelled",
            requested_ratio=blend.ratio if sel is not None else None)
