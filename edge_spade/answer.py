"""The answer to one question, with how it was reached: what the API returns, the CLI prints and
the server sends. Light on purpose (no numpy): `edge-spade ask --server` formats answers with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

SIGNALS = ("lspade", "spade", "cascade")  # the exit rules: an L-SPADE head's entropy, a SPADE probe's own,
# or both: L-SPADE checks first, then a SPADE probe for the prompts they did not let exit


@dataclass
class Answer:
    """One answer and how it was reached."""

    answer: str  # the chosen choice's text, or the next token's text
    choice_index: int | None  # None for a free answer
    label: str | None  # how the choice was named in the prompt ("B", "yes"); None for free answers
    probs: dict[str, float]  # choice -> probability (free answers: the top tokens)
    mode: str  # "full" | "spade" | "logit-lens"
    layer: int  # the layer whose state decided (n_layers - 1 for full depth)
    n_layers: int
    prompt_tokens: int
    timings_ms: dict[str, float]  # total, prefill, tail
    model: str
    token: int  # the winning token id (free answers) or the label's most likely token
    tail: int = 1  # SPADE tail width (prompt rows forwarded besides the start token)
    exit_layer: int | None = None  # spade-exit: the layer it stopped at (None: no exit, full answer)
    entropy: dict[int, float] | None = None  # spade-exit: head entropy (nats) at each evaluated layer
    threshold: float | None = None  # spade-exit: the threshold in force (a cascade's exit at a probe: the probe's)
    plan: str | None = None  # spade-exit: the prompt-length plan that applied ("free:33-64")
    guard: str | None = None  # spade-exit: why checks ran or not (see guard.SpeedGuard.decide; "plan": not here)
    outside_domain: list[int] | None = None  # spade-exit: head layers where the prompt lay outside the heads'
    # calibration domain (edge_spade/domain.py), so the head there did not decide
    reused_tokens: int = 0  # leading prompt tokens whose cache the last pass left (load_model(reuse_prefix=True))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Answer:
        """An Answer from its JSON form (entropy's layer keys come back as strings)."""
        known = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in raw.items() if k in known})
        if out.entropy is not None:
            out.entropy = {int(k): v for k, v in out.entropy.items()}
        return out
