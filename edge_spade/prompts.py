"""Questions turned into prompt tokens and a decision set.

- Choices are shown as lettered options; the decision set is the letter tokens.
- Choices yes/no (in either order) use the words themselves.
- No choices: the text is continued as is and the decision set is the whole vocabulary.

Each choice may own several tokens ("A" and " A"; "yes", " yes", "Yes", " Yes"): its score is
the log-sum-exp of their logits, so the answer does not hinge on which spelling the model
prefers after this particular prompt. When the model ships a chat template (in its GGUF),
multiple-choice prompts go through it as one user turn; free continuations never do.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from .errors import QuestionError

if TYPE_CHECKING:
    from .engine import Engine

MAX_CHOICES = 26


@dataclass(frozen=True)
class Prompt:
    """A formatted question: what the model reads and which tokens decide the answer."""

    text: str
    tokens: list[int]
    kind: str  # "letters" | "yesno" | "free"
    choices: tuple[str, ...]  # () for free answers
    labels: tuple[str, ...]  # what each choice is called in the prompt ("A", "yes", ...)
    ids: np.ndarray | None  # decision-set token ids; None = the whole vocabulary
    groups: tuple[tuple[int, ...], ...]  # per choice, its positions in `ids`

    def choice_logits(self, logits: np.ndarray) -> np.ndarray:
        """(n_choices,) scores from logits over `ids`: log-sum-exp within each choice."""
        return choice_logits(logits, self.groups)

    def decide(self, logits: np.ndarray) -> int:
        """The answer: a choice index, or the token id of a free answer (logits over the vocabulary)."""
        return int(np.argmax(logits if self.ids is None else self.choice_logits(logits)))


def choice_logits(logits: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Log-sum-exp of the decision-set logits of each choice's spellings."""
    return np.array([np.logaddexp.reduce(logits[list(g)]) for g in groups], dtype=np.float64)


def check_question(question: str, choices: Sequence[str] | None) -> tuple[str, tuple[str, ...]]:
    """Validate and normalise; raises QuestionError with what is wrong."""
    if not isinstance(question, str) or not question.strip():
        raise QuestionError("the question is empty")
    if isinstance(choices, str):
        raise QuestionError(f"choices must be a list of strings, not the string {choices!r}")
    if choices is not None and not all(isinstance(c, str) for c in choices):
        raise QuestionError("every choice must be a string")
    for text in (question, *(choices or ())):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise QuestionError(f"{text!r} is not valid UTF-8 text") from None
    if choices is None or len(choices) == 0:
        return question, ()
    cleaned = tuple(c.strip() for c in choices)
    if len(cleaned) < 2:
        raise QuestionError("give at least two choices, or none for a free answer")
    if len(cleaned) > MAX_CHOICES:
        raise QuestionError(f"at most {MAX_CHOICES} choices are supported, got {len(cleaned)}")
    if any(not c for c in cleaned):
        raise QuestionError("a choice is empty")
    dupes = sorted({c for c in cleaned if cleaned.count(c) > 1})  # case matters: "WW only" vs "Ww only"
    if dupes:
        raise QuestionError(f"duplicate choice(s): {', '.join(dupes)}")
    return question, cleaned


def is_yes_no(choices: Sequence[str]) -> bool:
    return sorted(c.casefold() for c in choices) == ["no", "yes"]


def format_question(question: str, choices: tuple[str, ...], labels: tuple[str, ...], chat: bool) -> str:
    """The user-visible text of a question (before any chat template)."""
    q = question.strip()
    if not choices:
        return question  # a free continuation is left exactly as written
    if labels == choices:  # yes/no
        return f"{q}\nAnswer yes or no." if chat else f"Question: {q}\nAnswer (yes or no):"
    options = "\n".join(f"{label}. {text}" for label, text in zip(labels, choices))
    if chat:
        return f"{q}\n{options}\nAnswer with the letter of the correct option."
    return f"Question: {q}\n{options}\nAnswer:"


# A chat template comes with the model file, so it is untrusted code: it runs in Jinja's sandbox,
# within bounds on what it may build and loop over, and on what it may write.
TEMPLATE_MAX_CHARS = 1 << 20  # the rendered prompt, and any string or list a template builds
TEMPLATE_MAX_STEPS = 200_000  # items all the template's range() calls may yield, together


class _Budget:
    def __init__(self) -> None:
        self.steps = 0


def render_chat(template: str, user: str, bos: str, eos: str) -> str:
    """Apply a GGUF chat template (Jinja, as in Hugging Face tokenizer configs) to one user turn."""
    return render_messages(template, [{"role": "user", "content": user}], bos, eos)


def render_messages(template: str, messages: list[dict[str, str]], bos: str, eos: str) -> str:
    """Apply a GGUF chat template to a conversation, ready for the assistant's next token.

    A template that fails, loops too long or writes too much is a QuestionError that says so
    (`--raw` skips the template), never a hang, a memory blow-up or a traceback.
    """
    from jinja2 import TemplateError

    env, compiled = _compile(template)
    env.budget = _Budget()
    parts, size = [], 0
    try:
        for chunk in compiled.generate(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos):
            size += len(chunk)
            if size > TEMPLATE_MAX_CHARS:
                raise _TemplateLimit(f"it wrote more than {TEMPLATE_MAX_CHARS} characters")
            parts.append(chunk)
    except QuestionError:
        raise
    except (
        TemplateError,
        _TemplateLimit,
        ArithmeticError,
        LookupError,
        TypeError,
        ValueError,
        RecursionError,
        MemoryError,
    ) as exc:
        raise QuestionError(
            f"the model's chat template failed ({type(exc).__name__}: {str(exc)[:200]}); --raw asks without it"
        ) from None
    return "".join(parts)


class _TemplateLimit(Exception):
    pass


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])
        budget = _Budget()

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise _TemplateLimit("an exponent over 64")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_CHARS:
                        raise _TemplateLimit(f"a string or list of more than {TEMPLATE_MAX_CHARS} items")
            return super().call_binop(context, operator, left, right)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def bounded_range(*args):
        for item in range(*args):
            env.budget.steps += 1
            if env.budget.steps > TEMPLATE_MAX_STEPS:
                raise _TemplateLimit(f"its loops ran past {TEMPLATE_MAX_STEPS} steps")
            yield item

    def raise_exception(message: str):
        raise QuestionError(f"the model's chat template refused the prompt: {message}")

    env.globals["range"] = bounded_range
    env.globals["raise_exception"] = raise_exception
    try:
        return env, env.from_string(template)
    except TemplateError as exc:
        raise QuestionError(f"the model's chat template does not parse ({exc}); --raw asks without it") from None


def build_prompt(
    engine: Engine, question: str, choices: Sequence[str] | None = None, template: bool | None = None
) -> Prompt:
    """Format, tokenize and pick the decision set. `template`: None = the model's own if it has one."""
    question, choices = check_question(question, choices)
    if not choices:
        tokens = engine.tokenize(question, parse_special=False)  # user text is plain text, never control tokens
        return Prompt(question, tokens, "free", (), (), None, ())
    yes_no = is_yes_no(choices)
    labels = choices if yes_no else tuple(string.ascii_uppercase[: len(choices)])
    chat_template = engine.chat_template if template in (None, True) else None
    if template is True and chat_template is None:
        raise QuestionError("this model has no chat template; drop --template")
    user = format_question(question, choices, labels, chat=chat_template is not None)
    if chat_template is not None:
        text, tokens = tokenize_chat(engine, chat_template, user)
    else:
        text = user
        tokens = engine.tokenize(text, parse_special=False)
    ids, groups = decision_set(engine, labels, any_case=yes_no)
    return Prompt(text, tokens, "yesno" if yes_no else "letters", choices, labels, ids, groups)


_USER = "\ue000edge-spade-user-turn\ue001"  # private-use characters: no template or question writes them


def spells_control_token(engine: Engine, text: str) -> bool:
    """Whether `text` would become control tokens if tokenized with special-token parsing on."""
    return engine.tokenize(text, add_special=False) != engine.tokenize(text, add_special=False, parse_special=False)


def adds_bos(engine: Engine, rendered: str) -> bool:
    """BOS to add before a rendered chat prompt: the model wants one and the template did not write it."""
    return engine.adds_bos and not rendered.startswith(engine.bos_text or "\0")


def tokenize_chat(engine: Engine, template: str, user: str) -> tuple[str, list[int]]:
    """The chat prompt's text and tokens, in which only the template's own markers are control tokens.

    User text that spells a control token (`<|im_end|>`, `<bos>`) would otherwise become one and
    could forge turns. Such text is tokenized apart, as plain text, between the template's parts;
    other text is tokenized whole, exactly as before (the split can move a merge at its edges).
    """
    text = render_chat(template, user, engine.bos_text, engine.eos_text)
    add_bos = adds_bos(engine, text)
    if not spells_control_token(engine, user):
        return text, engine.tokenize(text, add_special=add_bos)
    parts = render_chat(template, _USER, engine.bos_text, engine.eos_text).split(_USER)
    if len(parts) != 2:
        raise QuestionError("the question spells a control token and the model's chat template cannot keep it apart")
    head, tail = parts
    tokens = engine.tokenize(head, add_special=add_bos) + engine.tokenize(user, add_special=False, parse_special=False)
    return text, tokens + engine.tokenize(tail, add_special=False)


def chat_prompt(engine: Engine, messages: list[dict[str, str]]) -> Prompt:
    """A conversation through the model's chat template, for a free answer (the next token).

    Only the template's markers may be control tokens: a message that spells one is refused.
    """
    template = engine.chat_template
    if template is None:
        raise QuestionError("this model has no chat template; send the text itself as a completion")
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str):
            raise QuestionError("every message needs text content")
        if spells_control_token(engine, content):
            raise QuestionError(f"a {m.get('role', '')} message spells a control token of this model")
    text = render_messages(template, messages, engine.bos_text, engine.eos_text)
    return Prompt(text, engine.tokenize(text, add_special=adds_bos(engine, text)), "free", (), (), None, ())


def decision_set(
    engine: Engine, labels: Sequence[str], any_case: bool = False
) -> tuple[np.ndarray, tuple[tuple[int, ...], ...]]:
    """Single-token spellings of each label (with and without a leading space; for words,
    lower and capitalised too), as decision-set ids and per-label groups. Letters keep
    their case: " a" is an article, not option A."""
    ids: list[int] = []
    groups: list[tuple[int, ...]] = []
    owner: dict[int, str] = {}
    for label in labels:
        group: list[int] = []
        forms = (label.lower(), label.capitalize()) if any_case else (label,)
        for form in forms:
            for spelling in (form, " " + form):
                toks = engine.tokenize(spelling, add_special=False, parse_special=False)
                if len(toks) != 1:
                    continue
                tok = toks[0]
                if owner.setdefault(tok, label) != label:
                    raise QuestionError(f"choices {owner[tok]!r} and {label!r} share the token {tok}")
                if tok not in ids:
                    ids.append(tok)
                    group.append(len(ids) - 1)
        if not group:
            raise QuestionError(f"the label {label!r} is not a single token for this model")
        groups.append(tuple(group))
    return np.array(ids, dtype=np.int64), tuple(groups)
