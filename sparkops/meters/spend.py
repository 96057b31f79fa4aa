"""What runs spent, in the figures people compare: tokens, energy, GPU time, money.

A run's :class:`~sparkops.meters.usage.Usage` holds what was measured and what its
agent reported; :class:`Spend` is what the app, the review and the export show of
it: tokens as the agent counted them where it did (else as vLLM did), the GPUs'
energy in Wh and busy seconds, and, with the ``usage.*`` prices, what the energy
cost, what the agent paid a hosted API (its reported cost), and what the same
tokens would have cost on a hosted API. Spends add up (a task's runs, a phase, an
assignee); an unknown figure stays None ("not measured"), never 0, and a sum says
whether any part of it was an estimate or unknown.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from sparkops.config import Settings
from sparkops.meters.usage import Usage, add_known, sum_known

WH_PER_KWH = 1000.0
MILLION = 1_000_000.0


@dataclass(frozen=True)
class Prices:
    """The ``usage.*`` prices; 0 is "no price" (that cost is then None)."""

    per_kwh: float = 0.0
    prompt_per_million: float = 0.0
    generation_per_million: float = 0.0
    currency: str = "USD"

    @classmethod
    def of(cls, settings: Settings) -> Prices:
        return cls(per_kwh=settings["usage.energy_price_per_kwh"],
                   prompt_per_million=settings["usage.api_price_per_million_prompt_tokens"],
                   generation_per_million=settings["usage.api_price_per_million_generation_tokens"],
                   currency=settings["usage.currency"])

    @property
    def has_api_price(self) -> bool:
        return bool(self.prompt_per_million or self.generation_per_million)


@dataclass(frozen=True)
class Spend:
    """One run's spend, or the sum of several (``+``; :func:`total`)."""

    runs: int = 0
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    requests: float | None = None
    energy_wh: float | None = None
    gpu_seconds: float | None = None
    energy_cost: float | None = None    # the energy at usage.energy_price_per_kwh
    paid: float | None = None           # what the agents reported paying (their currency = usage.currency)
    api_cost: float | None = None       # the tokens at the usage.api_price_* prices
    metered: int = 0                    # runs with figures of their own (measured or reported)
    estimated: int = 0                  # runs whose figures were shared with others or cut by time
    reported: int = 0                   # runs whose agent reported its usage

    @classmethod
    def of(cls, usage: Usage | None, prices: Prices) -> Spend:
        """A run's spend; None: the run was not metered."""
        if usage is None:
            return cls(runs=1)
        said = usage.reported
        prompt, generated = usage.prompt, usage.generated
        energy_wh = usage.energy_wh
        api = None
        if prices.has_api_price and (prompt is not None or generated is not None):
            api = ((prompt or 0.0) * prices.prompt_per_million
                   + (generated or 0.0) * prices.generation_per_million) / MILLION
        paid = None
        if said is not None and said.cost is not None and (said.currency or prices.currency) == prices.currency:
            paid = said.cost
        return cls(runs=1, prompt_tokens=prompt, generation_tokens=generated, requests=usage.requests,
                   energy_wh=energy_wh, gpu_seconds=usage.gpu_seconds,
                   energy_cost=None if energy_wh is None or not prices.per_kwh
                   else energy_wh / WH_PER_KWH * prices.per_kwh,
                   paid=paid, api_cost=api, metered=1, estimated=int(usage.estimated), reported=int(said is not None))

    def __add__(self, other: Spend) -> Spend:
        return Spend(**{name: add_known(getattr(self, name), getattr(other, name)) for name in _FIELDS})

    @property
    def tokens(self) -> float | None:
        return sum_known((self.prompt_tokens, self.generation_tokens))

    @property
    def cost(self) -> float | None:
        """What it cost: the energy at its price and what the agents paid; None if neither is known."""
        return sum_known((self.energy_cost, self.paid))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens": self.tokens, "cost": self.cost}


def total(spends: Iterable[Spend]) -> Spend:
    """The sum of ``spends``, field by field (a figure None where every part is None):
    the same as adding them one by one, at a fraction of the time for thousands."""
    spends = list(spends)
    if len(spends) < 2:
        return spends[0] if spends else Spend()
    return Spend(**{name: sum_known([getattr(s, name) for s in spends]) for name in _FIELDS})


_FIELDS = tuple(f.name for f in fields(Spend))


#: How a figure of a spend is written for people: numbers with their unit, "not
#: measured" for an unknown.
def tokens_text(value: float | None) -> str:
    if value is None:
        return "not measured"
    if value >= 10_000_000:
        return f"{value / 1e6:.0f}M tokens"
    if value >= 1_000_000:
        return f"{value / 1e6:.1f}M tokens"
    if value >= 10_000:
        return f"{value / 1e3:.0f}k tokens"
    if value >= 1_000:
        return f"{value / 1e3:.1f}k tokens"
    return f"{value:.0f} tokens"


def energy_text(wh: float | None) -> str:
    if wh is None:
        return "not measured"
    return f"{wh / WH_PER_KWH:.2f} kWh" if wh >= 1000 else f"{wh:.1f} Wh" if wh >= 1 else f"{wh * 1000:.0f} mWh"


def money_text(amount: float | None, currency: str) -> str:
    if amount is None:
        return "no price"
    return f"{amount:,.2f} {currency}" if amount >= 0.995 else f"{amount:.3f} {currency}"


def describe(spend: Spend | None, prices: Prices) -> str:
    """One line of plain words about what runs spent, for the command line."""
    if spend is None or not spend.metered:
        return "not measured (no run was metered, and no agent reported its usage)"
    def count(value: float | None) -> str:
        return "not measured" if value is None else f"{value:,.0f}"
    words = [f"{tokens_text(spend.tokens)} ({count(spend.prompt_tokens)} prompt + "
             f"{count(spend.generation_tokens)} generated)", f"energy {energy_text(spend.energy_wh)}",
             "GPU busy " + ("not measured" if spend.gpu_seconds is None else f"{spend.gpu_seconds / 3600:.2f} h")]
    if spend.cost is not None:
        words.append(f"cost {money_text(spend.cost, prices.currency)}")
    if spend.api_cost is not None:
        words.append(f"on a hosted API {money_text(spend.api_cost, prices.currency)}")
    runs = f"{spend.metered} metered run{'s' if spend.metered != 1 else ''}"
    notes = [runs] + ([f"{spend.estimated} estimated"] if spend.estimated else []) + (
        [f"{spend.reported} reported by the agent"] if spend.reported else [])
    return ", ".join(words) + f" ({'; '.join(notes)})"
