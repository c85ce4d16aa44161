"""What a query asks of the engine, validated once, with every default written here: the REST
API, the OpenAI routes, `ragblend ask`, eval and bench all build a QuerySpec and hand it down
unchanged."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum



class BadQuery(ValueError):
    """A query the engine cannot serve as asked (the caller's fault: a 4xx, never a 500).
    `field` names what to change."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ContextOverflow(BadQuery):
    """The prompt (plus the answer's length) does not fit the model's context."""


class Mode(str, Enum):
    FULL = "full"        # every token computed (transformers' own forward): the reference
    PREFIX = "prefix"    # the exact cached prefix reused (what prefix caching gives)
    REUSE = "reuse"      # every chunk's cached KV reused, only the question computed
    BLEND = "blend"      # reuse plus a selected share of chunk tokens recomputed (CacheBlend)

    @classmethod
    def parse(cls, value: str | Mode) -> Mode:
        try:
            return cls(value)
        except ValueError:
            raise BadQuery("mode", f"must be one of {', '.join(m.value for m in cls)}, got {value!r}") from None


MODES = tuple(m.value for m in Mode)
# How blend picks the chunk tokens it recomputes (see blend/select.py). The default is the best
# measured (README, "Token selection").
SELECTIONS = ("value", "key", "attention", "first", "hybrid", "lookahead", "question", "question-value")
# The selections that first run the question over the stale KV through every layer (blend/question.py).
QUESTION_PASS = ("question", "question-value")
DEFAULT_SELECTION = "lookahead"
DEFAULT_RATIO = 0.15
DEFAULT_CHECK_LAYER = 1
DEFAULT_MAX_TOKENS = 128
# How far the loading controller (blend/loading.py) may raise a request's ratio when the request
# does not pin it and its chunk KV streams: at 0.5 blend costs about half a full prefill's compute;
# past that, recompute rarely hides under loading.
DEFAULT_MAX_RATIO = 0.5
# Prefill tokens per scheduler step (blend/scheduler.py): about one 3k-token prompt's blend, or a
# third of its full prefill — on an H200 ~30 ms of compute beside a 6-10 ms decode step.
PREFILL_TOKENS = 1024
# Decode slots (blend/batch.py, sized by blend/memory.py): one slot holds one query's prompt and
# answer. On CUDA the slots get this share of the memory left once the weights, the prefill's peak,
# the decode graphs' outputs and the device tier are counted (vLLM's gpu_memory_utilization, but of
# what is left); on CPU, where nothing is measured, CPU_KV_MB. The batch is as large as the slots.
SLOT_TOKENS = 4096
KV_MEMORY_SHARE = 0.9
CPU_KV_MB = 4096
# What the sampler can use. Below MIN_TEMPERATURE sampling is greedy but for rounding, and logits
# divided by ~1e-37 overflow float32 (a NaN distribution); below MIN_TOP_P the nucleus is the top
# token whatever the value, and past float32's smallest subnormal (~7e-46) it rounds to 0 and
# empties the nucleus. Refused when the request is parsed (422 naming the field), never at decode.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 2.0
MIN_TOP_P = 1e-6
# The `question` selection scores chunk tokens by the question's attention at this many last layers
# (InfoFlow-KV's choice: the last two).
DEFAULT_QUESTION_LAYERS = 2
# Gradual filtering: the first of several check layers keeps this many times the final share.
GRADUAL_WIDEN = 2.0


@dataclass(frozen=True)
class BlendConfig:
    """`later_checks`: more check layers after `check_layer` (CacheBlend's gradual filtering): the
    first keeps a wider set, each later one narrows it, and the token-layers recomputed after the
    first check layer stay those of one check at `ratio` (select.gradual_counts).
    `question_layers`: how many last layers score chunk tokens in the `question` selection.
    `max_ratio`: how far the loading controller (blend/loading.py) may raise the ratio when the
    chunk KV streams from a slower tier and loading hides the recompute; None pins the ratio."""
    ratio: float = DEFAULT_RATIO
    check_layer: int = DEFAULT_CHECK_LAYER
    selection: str = DEFAULT_SELECTION
    later_checks: tuple[int, ...] = ()
    question_layers: int = DEFAULT_QUESTION_LAYERS
    max_ratio: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise BadQuery("ratio", f"must be in [0, 1], got {self.ratio}")
        if self.check_layer < 0:
            raise BadQuery("check_layer", f"must be ≥ 0, got {self.check_layer}")
        if self.selection not in SELECTIONS:
            raise BadQuery("selection", f"must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.max_ratio is not None and not self.ratio <= self.max_ratio <= 1.0:
            raise BadQuery("max_ratio", f"must be in [ratio, 1] = [{self.ratio}, 1], got {self.max_ratio}")
        object.__setattr__(self, "later_checks", tuple(int(c) for c in self.later_checks))
        layers = self.check_layers
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise BadQuery("check_layers", f"must be strictly increasing, got {','.join(map(str, layers))}")
        if self.question_layers < 1:
            raise BadQuery("question_layers", f"must be ≥ 1, got {self.question_layers}")

    @property
    def check_layers(self) -> tuple[int, ...]:
        return (self.check_layer, *self.later_checks)

    @classmethod
    def with_checks(cls, check_layers: str | tuple[int, ...] | list[int], **kw) -> BlendConfig:
        """From a list of check layers ("1,8" or [1, 8]): the first, then the later ones."""
        if isinstance(check_layers, str):
            try:
                check_layers = [int(x) for x in check_layers.split(",") if x.strip()]
            except ValueError:
                raise BadQuery("check_layers", f"must be comma-separated integers, got {check_layers!r}") from None
        if not check_layers:
            raise BadQuery("check_layers", "needs at least one layer")
        return cls(check_layer=check_layers[0], later_checks=tuple(check_layers[1:]), **kw)


# Repetition control (blend/penalties.py), OpenAI's and vLLM's ranges. The neutral values are the
# defaults of the API, as in OpenAI's and vLLM's; `ask` and the web page default to
# BUNDLED_PENALTIES for the bundled model, whose answers loop without them (README, "Answers").
FREQUENCY_PENALTY_RANGE = (-2.0, 2.0)
PRESENCE_PENALTY_RANGE = (-2.0, 2.0)
MAX_REPETITION_PENALTY = 2.0
BUNDLED_PENALTIES = {"frequency_penalty": 1.0}  # measured: README, "Answers"


def default_penalties(bundled: bool) -> dict[str, float]:
    """The penalties `ask` and the web page start from: BUNDLED_PENALTIES for the bundled model,
    none for a model of the user's choosing (its own card knows better)."""
    return dict(BUNDLED_PENALTIES) if bundled else {}


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0   # 0 → greedy
    top_p: float = 1.0
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name, problem in (("temperature", temperature_problem(self.temperature)),
                              ("top_p", top_p_problem(self.top_p))):
            if problem:
                raise BadQuery(name, problem)
        for name, (lo, hi) in (("frequency_penalty", FREQUENCY_PENALTY_RANGE),
                               ("presence_penalty", PRESENCE_PENALTY_RANGE)):
            if not lo <= getattr(self, name) <= hi:
                raise BadQuery(name, f"must be in [{lo:g}, {hi:g}], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise BadQuery("repetition_penalty",
                           f"must be in (0, {MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty}")

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (rows without one skip blend/penalties.py)."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0


def temperature_problem(value: float) -> str | None:
    """Why the sampler cannot use this temperature, or None (the one rule; api/schemas.py uses it)."""
    if value == 0.0:
        return None
    if not (MIN_TEMPERATURE <= value <= MAX_TEMPERATURE):  # NaN fails this too
        return f"must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {value}"
    return None


def top_p_problem(value: float) -> str | None:
    """Why the sampler cannot use this top_p, or None."""
    if not (MIN_TOP_P <= value <= 1.0):
        return f"must be in [{MIN_TOP_P}, 1], got {value}"
    return None


@dataclass(frozen=True)
class QuerySpec:
    mode: Mode = Mode.BLEND
    blend: BlendConfig = field(default_factory=BlendConfig)
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int = DEFAULT_MAX_TOKENS

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.parse(self.mode))
        if self.max_tokens < 1:
            raise BadQuery("max_tokens", f"must be ≥ 1, got {self.max_tokens}")

    def check_model(self, n_layers: int) -> None:
        """What depends on the model: the check layer must be one of its layers."""
        if self.mode is Mode.BLEND and self.blend.check_layers[-1] >= n_layers:
            name = "check_layer" if not self.blend.later_checks else "check_layers"
            raise BadQuery(name, f"must be below the model's {n_layers} layers, got {self.blend.check_layers[-1]}")

    def describe(self) -> dict:
        """The settings that change an answer, flat (for results files and responses)."""
        blend = self.mode is Mode.BLEND
        return {"mode": self.mode.value, "ratio": self.blend.ratio if blend else None,
                "check_layer": self.blend.check_layer if blend else None,
                "selection": self.blend.selection if blend else None,
                "later_checks": list(self.blend.later_checks) if blend else None,
                "max_ratio": self.blend.max_ratio if blend else None}
