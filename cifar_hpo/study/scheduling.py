"""Pause and promote: which trial goes on at a rung, which paused trial a worker resumes, when a study is done.

    rule = scheduling.rule_of(spec)                             # None unless [pruner] kind = "promote"
    d = scheduling.at_rung(rule, configs, key, epoch, new_left=...)  # the objective, after a rung's report
    w = scheduling.next_work(rule, configs, new_left=...)       # a worker looking for work
    configs = scheduling.ladder(study.get_trials())             # the study as the rule sees it (live)

The rule is ASHA's promotion variant (Li et al., "A System for Massively Parallel Hyperparameter
Tuning", MLSys 2020) for a study of a finite number of configurations. Rungs are the epochs
``min_resource * eta**k`` that leave a whole step after them (`pruning.promotion_rungs`). A trial that reaches a rung goes on only when
it ranks in the top ``n // eta`` of the ``n`` configurations that reached that rung so far;
otherwise it is *paused* (its snapshot kept), not stopped. A worker looking for work first
resumes the paused trial that now ranks in its rung's top ``n // eta`` (highest rung first, then
the best value), and otherwise starts a new configuration. So a configuration that starts slowly
is not lost to the few trials that happened to run before it: it is ranked again whenever later
trials reach its rung, and promoted when it earns it, however late the evidence comes.

Once no new configuration is left to start (the study's ``--trials`` are all begun), a rung is
*settled* when nothing can reach it any more (no active trial below it, nothing promotable
below it); the top ``max(1, n // eta)`` of a settled rung are promoted, so at least one
configuration trains to the end at every rung, as successive halving's last bracket does. When
nothing is active and nothing promotable is left, the paused trials are stopped, each with its
reason ("stopped at epoch 4: rank 7 of 24, the top 6 went on").

The model's registry recipe, the first configuration of every new study, is *protected*: it
trains to the end, so a study is never worse than its default. Its values are ranked like any
other's.

Everything here is a pure function of plain values: the live workers (`ladder` of the study's
trials) and ``cifar-hpo bench search``'s replay (`simulate`) run the same rule.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from cifar_hpo.storage import heartbeat, record
from cifar_hpo.study.pruning import promotion_rungs


class Status(enum.Enum):
    """Where a configuration stands."""

    ACTIVE = "active"  # training, or about to (a waiting retry of a killed trial)
    PAUSED = "paused"  # stopped at a rung with its snapshot, may be resumed
    DONE = "done"  # complete, or stopped for good (pruned)


@dataclass(frozen=True)
class Config:
    """One configuration as the rule sees it.

    Attributes:
        key: its lineage (the number of its first trial; a retry keeps its original's).
        values: epoch -> reported validation accuracy, every epoch it trained.
        status: see `Status`.
        protected: the study's recipe: never paused.
    """

    key: int
    values: Mapping[int, float]
    status: Status
    protected: bool = False

    @property
    def epoch(self) -> int:
        """The last epoch it reported (0 before its first); a paused configuration is paused there."""
        return max(self.values, default=0)


@dataclass(frozen=True)
class Rule:
    """The promotion rule of a study: its rungs (epochs below ``epochs``), reduction factor and epochs per trial."""

    rungs: tuple[int, ...]
    eta: int
    epochs: int

    def next_stop(self, epoch: int) -> int:
        """The epoch where a configuration that reported ``epoch`` next reaches a rung, or its last epoch."""
        return next((r for r in self.rungs if r > epoch), self.epochs)


def make_rule(min_resource: int, eta: int, epochs: int) -> Rule:
    """The promotion rule for trials of ``epochs`` epochs: its rungs are `pruning.promotion_rungs`."""
    return Rule(tuple(promotion_rungs(min_resource, eta, epochs)), eta, epochs)


def epochs_left(rule: Rule, configs: Sequence[Config], n: int) -> int:
    """Epochs the rule still has to train for a study of ``n`` configurations, of which ``configs`` have begun.

    For the progress line's time left. Between two stops (rungs, and the last epoch) the study trains at
    least as many configurations as go on past the first stop (trained beyond it, active there: the
    objective asks after its rung decision; and the protected recipe), and at least the ``max(1, m // eta)``
    that a settled rung of ``m`` promotes (synchronous halving's count: ``rf 3``, rungs 1 and 3 of 10
    epochs, 20 configurations: 20, 6 and 2). What they need, less what was trained in each stretch. The
    asynchronous rule may promote more than that count, so this is a lower estimate while trials still
    start; it is 0 only when nothing is left to train.
    """
    stops = [0, *rule.rungs, rule.epochs]
    reach = max(n, len(configs))
    left = 0
    for k in range(len(stops) - 1):
        lo, hi = stops[k], stops[k + 1]
        if k > 0:
            going_on = sum(1 for c in configs if c.epoch > lo or (c.epoch == lo and c.status == Status.ACTIVE)
                           or (c.protected and c.status != Status.DONE))  # fmt: skip
            reach = min(reach, max(keep_settled(reach, rule.eta), going_on))
        trained = sum(min(max(c.epoch - lo, 0), hi - lo) for c in configs)
        left += max(0, reach * (hi - lo) - trained)
    return left


def rule_of(spec: Any) -> Rule | None:
    """The promotion rule of ``spec`` (a StudySpec), or None when its pruner is not ``promote``."""
    p = spec.pruner
    return make_rule(p.min_resource, p.reduction_factor, spec.epochs) if p.kind == "promote" else None


def keep(n: int, eta: int) -> int:
    """How many of the ``n`` configurations at a rung go on while new ones may still arrive there."""
    return n // eta


def keep_settled(n: int, eta: int) -> int:
    """How many go on from a settled rung: at least one."""
    return max(1, n // eta)


def _order(value: float) -> float:
    return -value if not math.isnan(value) else math.inf  # NaN ranks last


@dataclass(frozen=True)
class Standing:
    """A configuration's place at an epoch: rank (1 = best) of ``n`` that reached it, and how many go on from there."""

    epoch: int
    rank: int
    n: int
    keep: int

    @property
    def goes_on(self) -> bool:
        return self.rank <= self.keep

    def words(self) -> str:
        """ "rank 7 of 24, the top 6 go on": its rank among the configurations that reached its epoch."""
        top = f"the top {self.keep} go on" if self.keep > 1 else ("the best goes on" if self.keep == 1 else "none goes on yet")
        return f"rank {self.rank} of {self.n}, {top}"


def _ranks(configs: Sequence[Config]) -> Callable[[Config], tuple[int, int]]:
    """(rank, n) of a configuration among those that reported its last epoch; ties go to the earlier configuration.

    Each epoch's order is sorted once per call of the rule (a study of a thousand trials decides in milliseconds).
    """
    orders: dict[int, dict[int, int]] = {}

    def rank(c: Config) -> tuple[int, int]:
        if c.epoch not in orders:
            there = sorted((o for o in configs if c.epoch in o.values), key=lambda o: (_order(o.values[c.epoch]), o.key))
            orders[c.epoch] = {o.key: i for i, o in enumerate(there, 1)}
        return orders[c.epoch][c.key], len(orders[c.epoch])

    return rank


def _standing(rule: Rule, rank: Callable[[Config], tuple[int, int]], c: Config, *, settled: bool) -> Standing:
    r, n = rank(c)
    return Standing(c.epoch, r, n, keep_settled(n, rule.eta) if settled else keep(n, rule.eta))


def _unsettled_from(rule: Rule, configs: Sequence[Config], rank: Callable[[Config], tuple[int, int]], *, new_left: bool) -> float:
    """The lowest rung some configuration may still reach from below (inf: every rung is settled).

    While new configurations may start, nothing is settled. Then a rung is unsettled when an active
    configuration is below it, or when a paused one below it is promotable (it will come).
    """
    if new_left:
        return -math.inf
    lowest = math.inf
    for c in configs:
        if c.status is Status.ACTIVE:
            lowest = min(lowest, rule.next_stop(c.epoch))
    for r in rule.rungs:  # ascending: a promotion from r makes r's next stop unsettled
        if r >= lowest:
            break
        if any(c.status is Status.PAUSED and c.epoch == r and _standing(rule, rank, c, settled=True).goes_on for c in configs):
            lowest = min(lowest, rule.next_stop(r))
    return lowest


def standings(rule: Rule, configs: Sequence[Config], *, new_left: bool) -> dict[int, Standing]:
    """Where each paused configuration stands at the epoch it paused: its rank there and how many go on.

    Its rung counts as settled (at least one goes on) when no new configuration is left and nothing
    else can reach it any more.
    """
    rank = _ranks(configs)
    lowest = _unsettled_from(rule, configs, rank, new_left=new_left)
    return {c.key: _standing(rule, rank, c, settled=lowest > c.epoch) for c in configs if c.status is Status.PAUSED}


@dataclass(frozen=True)
class Decision:
    """What a trial does at the end of an epoch: go on, or pause (with its standing, for the record)."""

    go_on: bool
    standing: Standing | None = None  # None off the rungs, and for the protected recipe


def at_rung(rule: Rule, configs: Sequence[Config], key: int, epoch: int, *, new_left: bool) -> Decision:
    """Whether configuration ``key``, which has just reported ``epoch``, goes on or pauses.

    ``configs`` must include it with its value at ``epoch`` (any status: it is ranked as if paused there).
    """
    if epoch not in rule.rungs or epoch >= rule.epochs:
        return Decision(True)
    if next(c for c in configs if c.key == key).protected:
        return Decision(True)
    here = [Config(c.key, c.values, Status.PAUSED, c.protected) if c.key == key else c for c in configs]
    s = standings(rule, here, new_left=new_left)[key]
    return Decision(s.goes_on, s)


@dataclass(frozen=True)
class Work:
    """What a worker does next: ``resume`` a paused configuration, start a ``new`` one, ``wait``, ``stop`` the paused ones, or ``done``."""

    kind: str  # "resume", "new", "wait", "stop", "done"
    key: int | None = None  # resume: the configuration
    standing: Standing | None = None  # resume: why it goes on
    stop: tuple[tuple[int, Standing], ...] = ()  # stop: each paused configuration and its final standing


def next_work(rule: Rule, configs: Sequence[Config], *, new_left: bool) -> Work:
    """What a worker looking for work does next (see the module's docstring).

    First the paused configuration that ranks in its rung's top now (highest rung first, then the
    best rank); else a new configuration; else wait for the active ones; else stop the paused ones.
    """
    paused = standings(rule, configs, new_left=new_left)
    ready = sorted((-s.epoch, s.rank, key) for key, s in paused.items() if s.goes_on)
    if ready:
        key = ready[0][2]
        return Work("resume", key, paused[key])
    if new_left:
        return Work("new")
    if any(c.status is Status.ACTIVE for c in configs):
        return Work("wait")
    if paused:
        return Work("stop", stop=tuple(sorted(paused.items())))
    return Work("done")


# ---------------------------------------------------------------- the study as the rule sees it


def ladder(trials: Sequence[optuna.trial.FrozenTrial]) -> list[Config]:
    """The study's configurations: one per lineage (a killed trial and its retries are one configuration).

    A lineage's newest trial that is not FAIL speaks for it; a killed trial still awaiting its retry
    is active. Configurations whose trials all failed otherwise are out of the race.
    """
    awaiting = {t.number for t in heartbeat.awaiting_retry(trials)}
    newest: dict[int, optuna.trial.FrozenTrial] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.state != TrialState.FAIL or t.number in awaiting:
            newest[heartbeat.lineage(t)] = t
    out = []
    for key, t in sorted(newest.items()):
        rec = record.read(t)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            status = Status.DONE
        elif record.is_paused(t):
            status = Status.PAUSED
        else:
            status = Status.ACTIVE
        out.append(Config(key, dict(t.intermediate_values), status, protected=rec.origin == record.RECIPE))
    return out


_HOLDING = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def held_slots(trials: Sequence[optuna.trial.FrozenTrial], below: int | None = None) -> set[int]:
    """The lineages (first trial numbers, see `heartbeat.lineage`) that hold one of the study's ``--trials`` slots.

    A lineage holds its slot while one of its trials is finished, running (paused included) or
    waiting, and while its killed trial awaits its retry (`heartbeat.awaiting_retry`). Counted by
    lineage, not by trial: a retry keeps its original's place, so a killed trial, its FAIL and its
    retry hold the slot without a gap in which another configuration could take it. ``below``: only
    lineages that began below that trial number.
    """
    awaiting = {t.number for t in heartbeat.awaiting_retry(trials)}
    held = {heartbeat.lineage(t) for t in trials if t.state in _HOLDING or t.number in awaiting}
    return held if below is None else {first for first in held if first < below}


def decide(study: optuna.Study, rule: Rule, key: int, epoch: int, target: int) -> Decision:
    """`at_rung` for configuration ``key`` of a live study that wants ``target`` configurations, read from its database."""
    trials = study.get_trials(deepcopy=False)
    return at_rung(rule, ladder(trials), key, epoch, new_left=len(held_slots(trials)) < target)


# ---------------------------------------------------------------- replay on recorded curves


@dataclass
class Replay:
    """What the rule did on recorded curves: epochs trained, best final value, and the trace of the best."""

    epochs: float
    best: float
    trace: list[tuple[float, float]] = field(default_factory=list)  # (epochs so far, best so far) after each completion
    completed: list[int] = field(default_factory=list)  # configurations trained to the end, in order
    wall: float = 0.0  # simulated time (one epoch = 1) until the last worker finished


class Hooks:
    """What `simulate` tells an observer as it goes (a replay through a real sampler, `bench search --samplers`)."""

    def report(self, i: int, epoch: int, value: float) -> None:
        """Configuration ``i`` reported ``value`` after ``epoch``."""

    def pause(self, i: int, standing: Standing) -> None:
        """Configuration ``i`` paused."""

    def resume(self, i: int) -> None:
        """Configuration ``i`` was promoted and trains on."""

    def complete(self, i: int, value: float) -> None:
        """Configuration ``i`` trained to the end and scored ``value``."""

    def stop(self, i: int) -> None:
        """Configuration ``i`` was stopped for good at the end."""


def simulate(rule: Rule, curves: Sequence[Sequence[float]], *, workers: int = 1, protected: Sequence[int] = (),
             value: Callable[[Sequence[float]], float] = max, hooks: Hooks | None = None) -> Replay:  # fmt: skip
    """Run the rule on recorded learning curves with ``workers`` workers, as the live workers would.

    ``curves[i]``: configuration ``i``'s validation accuracy after each epoch (``rule.epochs`` values),
    started in that order; it is read when ``i`` starts (a lazy sequence may choose it then). Every
    epoch costs one unit of time and one epoch; a worker that finds nothing to do waits for the next
    worker to finish a piece of work. ``value``: what a completed configuration scores (the study's
    objective: its best epoch's accuracy).
    """
    n = len(curves)
    hooks = hooks or Hooks()
    values: list[dict[int, float]] = [{} for _ in range(n)]
    status: dict[int, Status] = {}
    started = 0
    consumed = 0.0
    out = Replay(epochs=0.0, best=-math.inf)
    running: list[tuple[float, int, int]] = []  # (time it reaches its stop, worker, configuration)
    now = 0.0

    def configs() -> list[Config]:
        return [Config(i, values[i], status[i], i in protected) for i in sorted(status)]

    def start(i: int, worker: int) -> None:
        status[i] = Status.ACTIVE
        at = max(values[i], default=0)
        heapq.heappush(running, (now + rule.next_stop(at) - at, worker, i))

    def take(worker: int) -> bool:
        nonlocal started
        w = next_work(rule, configs(), new_left=started < n)
        if w.kind == "resume":
            assert w.key is not None
            hooks.resume(w.key)
            start(w.key, worker)
            return True
        if w.kind == "new":
            started += 1
            curves[started - 1]  # chosen now
            start(started - 1, worker)
            return True
        if w.kind == "stop":
            for key, _ in w.stop:
                status[key] = Status.DONE
                hooks.stop(key)
        return False

    idle = list(range(workers))
    while True:
        while idle and take(idle[0]):
            idle.pop(0)
        if not running:
            break
        now, worker, i = heapq.heappop(running)
        before = max(values[i], default=0)
        stop = rule.next_stop(before)
        for e in range(before + 1, stop + 1):
            values[i][e] = float(curves[i][e - 1])
            hooks.report(i, e, values[i][e])
        consumed += stop - before
        if stop >= rule.epochs:
            status[i] = Status.DONE
            out.best = max(out.best, value(curves[i]))
            out.completed.append(i)
            out.trace.append((consumed, out.best))
            hooks.complete(i, value(curves[i]))
        else:
            d = at_rung(rule, configs(), i, stop, new_left=started < n)
            if d.go_on:
                heapq.heappush(running, (now + rule.next_stop(stop) - stop, worker, i))
                continue
            status[i] = Status.PAUSED
            assert d.standing is not None
            hooks.pause(i, d.standing)
        idle.append(worker)
        idle.sort()
    out.epochs = consumed
    out.wall = now
    return out
