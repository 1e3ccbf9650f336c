"""A time budget (``budget=20m``): how many seeds and epochs each model gets, planned from costs
measured on this machine so that the run fits, and the deadline it must not pass.

The planner is a pure function of (budget, measured costs, ranges): :func:`plan`. Its policy
follows what the measurements showed (docs/results.md, "a time budget"): a member's first epochs
pay the most, a second seed of the strongest model pays more than a weak extra member, and a
second network trained for half the epochs of the first costs it more than it adds. So, starting from
the first model of ``ensemble`` (the strongest: the screening orders it by score) at its lowest
seeds and epochs, with every model whose members already exist, it takes these steps in this
fixed order, as long as the next one fits:

1. raise the first model's epochs, one at a time, up to its configured ``train.epochs`` (its
   knee); then the next model joins (one seed at its lowest epochs) and its epochs rise to its
   knee; and so on down ``ensemble``;
2. add seeds to the first model up to its highest seeds, then to the next model, and so on;
3. raise the epochs further, round-robin, up to each model's highest epochs.

The plan is the longest prefix of that sequence that fits, so it never plans more than the budget,
and a larger budget never plans fewer member-epochs (the prefix only grows). A model that has not
joined when the budget runs out is left out (0 seeds; the log and the plan's table say so). A
model whose members already exist (cached or checkpointed) keeps its epochs, so that re-running
with a larger budget continues them instead of starting over.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ArtifactError, ConfigError
from pipeline.io import save_json

_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_budget(value) -> float | None:
    """``budget=``: ``None`` (no budget), seconds as a number, or a duration ``20m``, ``2h``,
    ``90s``, ``1h30m``. Returns seconds (> 0) or None. Raises ConfigError for anything else."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        return None
    text = str(value).strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
        if not parts or not any(parts.groups()):
            raise ConfigError(f"budget={value}: expected seconds or a duration such as 20m, 2h, 1h30m") from None
        seconds = sum(float(g) * u for g, u in zip(parts.groups(), (3600, 60, 1)) if g)
    if not seconds > 0:
        raise ConfigError(f"budget={value}: expected a positive duration")
    return seconds


def format_minutes(seconds: float) -> str:
    """``seconds`` as minutes with one decimal (``12.5 min``), or as seconds below a minute."""
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


@dataclass(frozen=True)
class Range:
    """A model's planning range: epochs ``lo..hi`` with ``knee`` (its configured ``train.epochs``)
    where step 1 stops, and seeds ``seeds_lo..seeds_hi``."""

    epochs_lo: int
    knee: int
    epochs_hi: int
    seeds_lo: int
    seeds_hi: int


def unit_seconds(alone: float, share: float | None, timed: int, size: int) -> float:
    """Seconds of a unit of ``size`` members: ``alone`` for one member trained unfused (a unit of
    one always trains unfused); a fused group's, from one member alone (size 1) and the timed
    group (``timed`` members, ``share`` seconds each), linear in between, and ``share`` per member
    beyond it. ``share`` None: the members train unfused, ``size x alone``."""
    if share is None:
        return size * alone
    if size <= 1:
        return alone
    if size >= timed or timed <= 1:
        return size * share
    return alone + (timed * share - alone) * (size - 1) / (timed - 1)


@dataclass(frozen=True)
class Cost:
    """What a model's members cost here, in their own seconds (measured with as many units side by
    side as will train so): one member trained alone, ``per_epoch`` for each epoch and ``fixed``
    once (set-up, final prediction); ``folds`` members per seed. A model that trains fused also has
    ``group_per_epoch``, one member's share of an epoch of a fused group of ``group_size``
    (:func:`unit_seconds` sizes any other group from the two). ``solo_per_epoch``: an epoch of one
    member with the whole machine to itself (the odd last member of a round,
    :func:`side_by_side`), timed with one process where the others were timed side by side; None
    when not timed (then ``per_epoch``). ``once``: seconds the model costs once, whatever its
    seeds and folds (a transfer model's cached frozen pass, computed before training starts)."""

    per_epoch: float
    fixed: float
    folds: int
    group_per_epoch: float | None = None
    group_size: int = 1
    solo_per_epoch: float | None = None
    once: float = 0.0

    def unit(self, size: int, epochs: int, sharing: int | None = None) -> float:
        """Seconds of a unit of ``size`` members (one member, or a fused group) of ``epochs``
        epochs, trained with ``sharing`` units on the machine at once (:func:`side_by_side`; None:
        as many as were timed). One member alone on the machine (``sharing`` 1) costs
        ``solo_per_epoch`` per epoch when it was timed; every other unit its side-by-side price
        (a tail of several units shares the machine less than timed: at most that)."""
        if size == 1 and sharing == 1 and self.solo_per_epoch is not None:
            return epochs * self.solo_per_epoch + self.fixed
        return epochs * unit_seconds(self.per_epoch, self.group_per_epoch, self.group_size, size) + size * self.fixed

    def member(self, epochs: int) -> float:
        """Seconds of one member of ``epochs`` epochs trained unfused at the side-by-side rate."""
        return self.unit(1, epochs)


def group_sizes(n: int, largest: int, slots: int = 1) -> list[int]:
    """``n`` members cut into groups of at most ``largest``: the fewest such groups, but at least
    one per side-by-side slot (``slots``) while members last, as even as possible, largest first
    (15 with ``largest`` 8: 8 and 7; 5 with ``largest`` 15 on 4 slots: 2, 1, 1, 1)."""
    if n <= 0:
        return []
    groups = min(n, max(math.ceil(n / max(1, largest)), slots, 1))
    return [n // groups + (1 if i < n % groups else 0) for i in range(groups)]


def form_units(keys: list, group_of, largest: int, slots: int) -> list[tuple]:
    """The units that train as one, from ``keys`` in dispatch order: the keys that share a group
    (``group_of(key)``, a hashable; None: the key trains alone) cut in order into
    :func:`group_sizes` of at most ``largest`` on ``slots`` side-by-side slots, every other key a
    unit of its own; units in the order of their first key. The one rule both the budget's
    planner and ``stage=train``'s scheduler group members by."""
    groups: dict = {}
    units: list[tuple] = []
    for key in keys:
        g = group_of(key)
        if g is None:
            units.append((key,))
        else:
            groups.setdefault(g, []).append(key)
    for members in groups.values():
        start = 0
        for size in group_sizes(len(members), largest, slots):
            units.append(tuple(members[start:start + size]))
            start += size
    order = {k: i for i, k in enumerate(keys)}
    return sorted(units, key=lambda u: order[u[0]])


def makespan(durations: list[float], jobs: int) -> float:
    """Wall seconds of members of ``durations`` (seconds each, in dispatch order) on ``jobs``
    side-by-side slots, each member going to the first slot free (what the worker pool does)."""
    free = [0.0] * max(1, jobs)
    for d in durations:
        i = free.index(min(free))
        free[i] += d
    return max(free)


def side_by_side(models: list[str], n_jobs: int) -> list[int]:
    """How many units share the machine while each unit trains, ``n_jobs`` at a time, for the
    units' model names ``models`` in dispatch order: ``n_jobs`` for every full round and the
    remainder for the last round when every unit is of one model (equal lengths, so the rounds
    run in step): the odd 5th member of 5 on 2 jobs gets every core instead of half of them.
    With several models the rounds drift apart and a tail member would overlap a longer one
    (measured: a 3 s ``mlp`` member took 13.7 s on 2 threads beside a ``cnn_deotte`` on 1), so
    every unit keeps ``n_jobs``. Returns one share per unit, each in ``1..n_jobs``. The one rule
    ``stage=train``'s scheduler gives each worker its threads by and the planner prices by."""
    pending = len(models)
    tail = pending % n_jobs if len(set(models)) == 1 else 0
    return [n_jobs if i < pending - tail else tail for i in range(pending)]


@dataclass(frozen=True)
class ModelPlan:
    """One model's share of the plan: its seeds and epochs and their estimated wall seconds."""

    model: str
    seeds: int
    epochs: int
    seconds: float


@dataclass(frozen=True)
class Plan:
    """A budget's plan: ``models`` in ``ensemble`` order within ``available`` seconds of training
    (the budget less the time already spent and the ``reserve`` for prediction, blend and report)."""

    budget: float
    available: float
    reserve: float
    models: tuple[ModelPlan, ...]

    seconds: float = 0.0  # the planned training's estimated wall seconds (members side by side)

    def member_epochs(self, costs: dict[str, Cost]) -> int:
        """Epochs over every planned member (seeds x folds x epochs, summed over models)."""
        return sum(m.seeds * costs[m.model].folds * m.epochs for m in self.models)

    def table(self) -> str:
        """The plan as log lines: model, seeds, epochs, estimated minutes; then the reserve."""
        rows = [f"  {m.model:16s} {m.seeds} seed(s) x {m.epochs} epochs, {format_minutes(m.seconds)} of member time"
                if m.seeds else f"  {m.model:16s} left out: the models before it did not reach their train.epochs"
                for m in self.models]
        return "\n".join(rows + [f"  training about {format_minutes(self.seconds)} of {format_minutes(self.available)}"
                                 f" available; {format_minutes(self.reserve)} reserved for prediction, blend"
                                 f" and report"])


# The first model's first seed is the submission: the plan keeps it within the time available
# even if the machine runs this much slower after the timing (its steps timed +10% already).
FIRST_SEED_GUARD = 1.3


def reserve_seconds(budget: float) -> float:
    """Seconds a budget keeps for what follows training (the last members' test prediction, the
    blend, the report) and for the run's start-up: 20 s + 4% of the budget."""
    return 20.0 + 0.04 * budget


def dispatch(order: list[str], seeds: dict[str, int], folds: dict[str, int]) -> list[tuple[str, int, int]]:
    """The order ``stage=train`` starts members in under a budget: seed by seed, every model of
    ``order`` within a seed, every fold within a model: ``[(model, seed, fold), ...]``."""
    top = max(seeds.values(), default=0)
    return [(m, s, f) for s in range(top) for m in order if s < seeds[m] for f in range(folds[m])]


def plan(budget: float, available: float, costs: dict[str, Cost], ranges: dict[str, Range],
         order: list[str], fixed_epochs: dict[str, int] | None = None, jobs: int = 1,
         group_of=None, fuse_max: int = 1, guard: float = 1.0) -> Plan:
    """The seeds and epochs of each model of ``order`` that fit in ``available`` seconds (see the
    module docstring for the policy).

    Args:
        budget: the whole run's budget (seconds), recorded with the plan; available: seconds left
            for training now.
        costs / ranges: per model, :class:`Cost` measured here and its :class:`Range`.
        order: the models, strongest first (``ensemble`` order).
        fixed_epochs: models whose members already exist, with their epochs (kept).
        jobs: units trained side by side; the plan's wall seconds are the joined models'
            ``Cost.once`` plus the :func:`makespan` of its units (:func:`form_units` of its
            members in :func:`dispatch` order), each costing :meth:`Cost.unit` at its size and its
            share of the machine (:func:`side_by_side`: the odd last member of one model trains
            alone): exactly the units and seconds ``stage=train``'s scheduler will run.
        group_of: ``(model, seed, fold) -> hashable | None``: the fused group a member may join
            (None: it trains alone; default: every member alone); fuse_max: the largest group.
        guard: the first model's first seed (the submission) must end within ``available`` even
            ``guard`` times slower than timed (beyond its lowest epochs): ``stage=train`` passes
            :data:`FIRST_SEED_GUARD`; 1: no more than the whole plan's own limit.
    Returns:
        a :class:`Plan` whose ``seconds`` is at most ``available``; a model that did not join has
        0 seeds.
    Raises:
        ConfigError: one seed of the first model (and of each model with existing members) at its
            lowest epochs does not fit; the message gives the smallest budget that would.
    """
    fixed = dict(fixed_epochs or {})
    epochs = {m: fixed.get(m, ranges[m].epochs_lo) for m in order}
    seeds = {m: ranges[m].seeds_lo if i == 0 or m in fixed else 0 for i, m in enumerate(order)}  # 0: not joined
    folds = {m: costs[m].folds for m in order}

    def units() -> list[tuple]:
        return form_units(dispatch(order, seeds, folds), group_of or (lambda key: None), fuse_max, jobs)

    def once() -> float:  # the joined models' caches, computed before any unit trains
        return sum(costs[m].once for m in order if seeds[m])

    def total() -> float:
        return once() + makespan(priced(units(), costs, epochs, jobs), jobs)

    def guarded() -> bool:  # any step may change the first seed's price (a join shares the odd last round)
        return guard <= 1.0 or once() + first_seed(units(), costs, epochs, jobs) * guard <= available

    need = total()
    if need > available:
        least = ", ".join(f"{seeds[m]} seed of {m} at {epochs[m]} epoch(s)" for m in order if seeds[m])
        raise ConfigError(f"budget={format_minutes(budget)}: too small; {least} need about {format_minutes(need)} "
                          f"of training here; expected budget >= {math.ceil((need + budget - available) / 60)}m")
    for kind, model in _steps(order, ranges, fixed):
        before = (seeds[model], epochs[model])
        _take(kind, model, seeds, epochs, ranges)
        if total() > available or not guarded():
            seeds[model], epochs[model] = before
            break
    return _planned(budget, available, costs, order, seeds, epochs, units(), jobs)


def _planned(budget: float, available: float, costs: dict[str, Cost], order: list[str], seeds: dict[str, int],
             epochs: dict[str, int], units: list[tuple], jobs: int) -> Plan:
    """The :class:`Plan` of ``seeds`` and ``epochs`` trained as ``units``: each model's seconds
    (its ``Cost.once`` and its units') and the wall seconds (every ``once``, then the makespan)."""
    spent = priced(units, costs, epochs, jobs)
    once = {m: costs[m].once if seeds[m] else 0.0 for m in order}
    return Plan(budget, available, reserve_seconds(budget), tuple(
        ModelPlan(m, seeds[m], epochs[m], once[m] + sum(s for u, s in zip(units, spent) if u[0][0] == m))
        for m in order), sum(once.values()) + makespan(spent, jobs))


def first_seed(units: list[tuple], costs: dict[str, Cost], epochs: dict[str, int], jobs: int) -> float:
    """Wall seconds until the first model's first seed ends: the :func:`makespan` of the units
    that lead the dispatch order (``units``, tuples of ``(model, seed, fold)``) and hold any of
    its members."""
    first = units[0][0][0] if units else None
    mine = [u for u in units if any(k[0] == first and k[1] == 0 for k in u)]
    return makespan(priced(units, costs, epochs, jobs)[: len(mine)], jobs)


def priced(units: list[tuple], costs: dict[str, Cost], epochs: dict[str, int], jobs: int) -> list[float]:
    """Seconds of each of ``units`` (tuples of ``(model, seed, fold)``, in dispatch order) at its
    model's ``epochs``, each at its share of the machine on ``jobs`` slots (:func:`side_by_side`,
    :meth:`Cost.unit`)."""
    shares = side_by_side([u[0][0] for u in units], min(jobs, max(1, len(units))))
    return [costs[u[0][0]].unit(len(u), epochs[u[0][0]], share) for u, share in zip(units, shares)]


def _take(kind: str, model: str, seeds: dict[str, int], epochs: dict[str, int], ranges: dict[str, Range]) -> None:
    """Apply one step of :func:`_steps` to the plan's ``seeds`` and ``epochs`` (in place)."""
    if kind == "epoch":
        epochs[model] += 1
    elif kind == "join":
        seeds[model] = ranges[model].seeds_lo
    else:
        seeds[model] += 1


def _steps(order: list[str], ranges: dict[str, Range], fixed: dict[str, int]):
    """The fixed sequence of ``("join" | "epoch" | "seed", model)`` steps (the module docstring's
    1-3): the first model and those with existing members (``fixed``) have joined at the start."""
    epochs = {m: fixed.get(m, ranges[m].epochs_lo) for m in order}
    for i, m in enumerate(order):  # step 1: each model in turn, up to its knee
        if i > 0 and m not in fixed:
            yield "join", m
        while m not in fixed and epochs[m] < ranges[m].knee:
            epochs[m] += 1
            yield "epoch", m
    for m in order:  # step 2
        for _ in range(ranges[m].seeds_hi - ranges[m].seeds_lo):
            yield "seed", m
    raising = True  # step 3
    while raising:
        raising = False
        for m in order:
            if m not in fixed and epochs[m] < ranges[m].epochs_hi:
                epochs[m] += 1
                raising = True
                yield "epoch", m


@dataclass(frozen=True)
class BudgetRecord:
    """``artifacts/budget/plan.json``: a budgeted run's plan and what it completed.

    Attributes:
        started: the command's start (``time.time()``); deadline: ``started + budget``.
        complete: per model, its complete seeds (every fold done): what the blend uses.
        trained / stopped / dropped: members (``"<model> fold <k> [seed <s>]"``) trained, stopped
            at the deadline (checkpointed) and never started; train_seconds: training's wall time.
    """

    plan: Plan
    started: float
    deadline: float
    complete: dict = field(default_factory=dict)
    trained: tuple = ()
    stopped: tuple = ()
    dropped: tuple = ()
    train_seconds: float | None = None

    def to_json(self) -> dict:
        p = self.plan
        return {"budget_s": p.budget, "available_s": p.available, "reserve_s": p.reserve, "plan_s": p.seconds,
                "started": self.started, "deadline": self.deadline,
                "models": [{"model": m.model, "seeds": m.seeds, "epochs": m.epochs, "seconds": m.seconds}
                           for m in p.models],
                "complete": dict(self.complete), "trained": list(self.trained), "stopped": list(self.stopped),
                "dropped": list(self.dropped), "train_seconds": self.train_seconds}


def save_record(path: Path, record: BudgetRecord) -> None:
    """Write ``record`` to ``path`` atomically."""
    save_json(path, record.to_json())


def read_record(path: Path) -> BudgetRecord | None:
    """The record at ``path``, or None when there is none. Raises ArtifactError (one line) when
    it is not a plan this code wrote."""
    if not path.exists():
        return None
    try:
        j = json.loads(path.read_text())
        plan = Plan(float(j["budget_s"]), float(j["available_s"]), float(j["reserve_s"]),
                    tuple(ModelPlan(str(m["model"]), int(m["seeds"]), int(m["epochs"]), float(m["seconds"]))
                          for m in j["models"]), float(j["plan_s"]))
        return BudgetRecord(plan, float(j["started"]), float(j["deadline"]),
                            {str(k): int(v) for k, v in (j.get("complete") or {}).items()},
                            tuple(j.get("trained") or ()), tuple(j.get("stopped") or ()),
                            tuple(j.get("dropped") or ()), j.get("train_seconds"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: unreadable budget plan ({type(e).__name__}: {e}); run: python run.py "
                            f"stage=train budget=...") from None


def process_start() -> float:
    """When this command started (``time.time()``): the process's start time from ``/proc`` on
    Linux (so the interpreter's and Hydra's start-up count against the budget), else the time this
    module was first imported."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()
