"""Candidates 1 and 2 of issue 21: the prompt head Qwen gets, and whether per-chunk tokenization
differs from tokenizing the joined prompt (it would change both full and blend alike)."""
import sys
from pathlib import Path
from api.cli_common import load_engine
from api.cli_eval import _dataset
from eval.layouts import fit_to_context
from blend.prompt import Layout
eng = load_engine(sys.argv[1], "cpu", "float32")
p = eng.prompts
print("prefix text:", repr(p.prefix_text)); print("tail text:", repr(p.tail_text))
ds, retr = _dataset(sys.argv[2], Path(sys.argv[3]) if sys.argv[3] != '-' else None, 90, None)
n_diff = 0
for ex in ds.examples[:int(sys.argv[4])]:
    chunks = list(ex.chunks if ex.chunks is not None else retr(ex.question, 5))
    layout, _ = fit_to_context(eng, ex, chunks, 4)
    if ex.chunks is None:
        layout = Layout(layout.prefix, layout.chunks[::-1], layout.suffix)
    text = eng.tokenizer.decode(layout.ids())
    joined = p.encode(text)
    same = joined == layout.ids()
    n_diff += not same
    print(ex.id, "decode→encode identical:", same, len(joined), layout.n_tokens)
print("examples whose joined tokenization differs:", n_diff)
