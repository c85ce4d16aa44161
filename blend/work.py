"""What the model's loop (blend/scheduler.py) serves and within what limits: a request's `Job`,
`SideWork` (any other use of the model), and the `SchedulerConfig` that bounds them."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from blend.batch import BATCH_BUCKETS, KEY_STEP, KVSlots
from blend.prefill_work import PrefillWork, Runner
from blend.prompt import Layout
from blend.sequence import Answer, SeqState
from blend.spec import PREFILL_TOKENS, SLOT_TOKENS, QuerySpec
from store.tiers import ChunkKVSource

T = TypeVar("T")


class Cancelled(Exception):
    """The job's client left before its prompt was prefilled."""


class SchedulerFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"too many requests waiting; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    """One request as the scheduler serves it, and how it reports back."""
    layout: Layout
    spec: QuerySpec
    kv: ChunkKVSource
    on_start: Callable[[SeqState], None] = lambda seq: None       # prefilled (first token next)
    on_piece: Callable[[str], None] = lambda piece: None          # new text
    on_done: Callable[[Answer], None] = lambda answer: None       # the end (finish_reason says how)
    on_error: Callable[[BaseException], None] = lambda error: None  # failed (before or while decoding)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)
    work: PrefillWork | None = None  # its prefill, once admitted


@dataclass(eq=False)
class SideWork(Generic[T]):
    """Model work that is not a request's generation (a chunk's KV, a logprob pass): run whole,
    in its turn, counting `cost` tokens against the step's budget."""
    fn: Callable[[], T]
    cost: int
    done: threading.Event = field(default_factory=threading.Event)
    result: T | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 32              # sequences decoding together (1: one request at a time)
    slots: int = 32                  # KV slots (≥ max_batch to use it)
    slot_tokens: int = SLOT_TOKENS   # prompt + answer tokens per slot
    max_waiting: int = 32            # queued requests past which submit refuses
    prefill_tokens: int = PREFILL_TOKENS  # prefill tokens per step (at least one piece)

    def __post_init__(self) -> None:
        for name in ("max_batch", "slots", "slot_tokens", "max_waiting", "prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")

    @classmethod
    def for_memory(cls, engine: Runner, kv_bytes: int, **kw) -> "SchedulerConfig":
        """As many slots as `kv_bytes` of decode KV memory holds, up to `max_batch` (when given)
        or the largest batch bucket: a slot past the batch could never be used. Raises ValueError
        when not even one slot fits."""
        slot_tokens = min(kw.pop("slot_tokens", None) or SLOT_TOKENS, engine.max_context)
        per_slot = KVSlots.bytes_per_token(engine.parts) * slot_size(slot_tokens)
        slots = kv_bytes // per_slot
        if slots < 1:
            raise ValueError(f"{kv_bytes >> 20} MiB of decode memory hold no slot of {slot_tokens} tokens "
                             f"({per_slot >> 20} MiB): lower slot_tokens or give the slots more memory")
        slots = min(slots, kw.pop("max_batch", None) or BATCH_BUCKETS[-1], BATCH_BUCKETS[-1])
        return cls(slots=slots, slot_tokens=slot_tokens, max_batch=slots, **kw)


def slot_size(tokens: int) -> int:
    """A slot's length: `tokens` rounded up to the decode step's key bucket."""
    return -(-tokens // KEY_STEP) * KEY_STEP


# The config an engine starts with, for requests stepped inline (ask, eval, bench): one slot,
# allocated on first use and grown to fit the longest request so far; no prefill budget, since a
# request answered alone has no running sequence to protect (the TTFT bench times it whole).
INLINE = SchedulerConfig(max_batch=1, slots=1, slot_tokens=1, max_waiting=1 << 30, prefill_tokens=1 << 30)
