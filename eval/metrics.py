"""Answer quality against references (token F1, ROUGE-L) and distance to `full` (first-token KL,
greedy agreement), as LongBench and the CacheBlend paper score them."""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """LongBench's (and SQuAD's) normalization: lowercase, drop punctuation and articles, fix spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def _empty_pair(a: Sequence, b: Sequence) -> float | None:
    """Two empty sequences agree perfectly; one empty against a non-empty one shares nothing."""
    if not a or not b:
        return float(not a and not b)
    return None


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 of the normalized strings (LongBench `qa_f1_score`)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    empty = _empty_pair(pred, ref)
    if empty is not None:
        return empty
    return _f1(sum((Counter(pred) & Counter(ref)).values()), len(pred), len(ref))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Longest common subsequence, one row of the DP table at a time."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0  # row[j-1] of the previous row
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def lcs_f1(a: Sequence, b: Sequence) -> float:
    """ROUGE-L F (β = 1) of two token sequences."""
    empty = _empty_pair(a, b)
    if empty is not None:
        return empty
    return _f1(lcs_length(a, b), len(a), len(b))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F over the words of the normalized strings."""
    return lcs_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def best_over(metric, prediction: str, references: Sequence[str]) -> float:
    """A prediction's score is its best against any of the accepted answers."""
    return max((metric(prediction, r) for r in references), default=0.0)


LOOP_NGRAM = 8  # an answer "loops" when some run of this many words occurs in it twice


def contains_answer(prediction: str, references: Sequence[str]) -> float:
    """1.0 when a normalized reference occurs in the normalized prediction, as whole words: what a
    reader checks first, and kind to long answers that F1 punishes for their length."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(ref and f" {ref} " in pred for ref in (normalize_answer(r) for r in references)))


def loops(text: str, n: int = LOOP_NGRAM) -> float:
    """1.0 when some n-gram of the answer's words occurs twice (it repeats itself)."""
    words = normalize_answer(text).split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return float(len(set(grams)) < len(grams))


def kl_first_token(full_logits: torch.Tensor, mode_logits: torch.Tensor) -> float:
    """KL(full ‖ mode) of the first output token's distribution, in nats. In float64: the values
    that matter near r = 1 are ~1e-9, below float32's resolution of log-probabilities."""
    logp = torch.log_softmax(full_logits.double(), dim=-1)
    logq = torch.log_softmax(mode_logits.double(), dim=-1)
    return max(0.0, float((logp.exp() * (logp - logq)).sum()))


def agreement(full_ids: Sequence[int], mode_ids: Sequence[int]) -> float:
    """1.0 when the greedy answer is token for token the one `full` gave."""
    return float(list(full_ids) == list(mode_ids))


def leading_agreement(full_ids: Sequence[int], mode_ids: Sequence[int]) -> int:
    """How many leading tokens of the greedy answer are `full`'s: a grade where `agreement` is all or
    nothing (one early token changed makes the rest differ, however close it stays)."""
    n = 0
    for a, b in zip(full_ids, mode_ids):
        if a != b:
            break
        n += 1
    return n


def recompute_fraction(recomputed_tokens: int, chunk_tokens: int) -> float:
    return recomputed_tokens / chunk_tokens if chunk_tokens else 0.0
