"""spec.promote: which model ships, decided by the run's own evaluation. Pure (no I/O).

Once every stage succeeded, the eval stage `promote.eval` (default: the last one) has measured one
candidate, or several (an eval of a matrix's variants or of eval.stages: one entry each). Each
candidate's metrics meet each gate or not (min, max, or at least as good as another eval stage's
value); among the candidates that pass every gate the best by `chooseBy` is promoted, its stage's
final/ the model (for a sweep, one variant: named with its matrix values in status.promotion, marked
promoted in status.comparison; the one exports write and serving points at). None passing: the run
is Held (phase Held, Ready=False, Stalled=True: a GitOps wait fails instead of shipping), and
status.promotion says which gates failed with which values.
"""

from __future__ import annotations

from .api import AlignmentRun
from .api.status import AlignmentRunStatus, GateResult, PromotionStatus, StageStatus, condition

HELD = "Held"


def lower_is_better(metric: str) -> bool:
    return any(w in metric for w in ("loss", "perplexity", "ppl", "seconds"))


def _entries(run: AlignmentRun, stages: list[StageStatus], eval_name: str) -> list[StageStatus]:
    """The status entries of eval stage `eval_name` (itself, or its expanded entries)."""
    return [s for s in stages if s.name == eval_name or getattr(run.expansion.get(s.name), "of", None) == eval_name]


def _evaluated(run: AlignmentRun, entry: str) -> str | None:
    """The trained stage an eval entry measured."""
    from .render.recipe import start_stage

    names = [s.name for s in run.spec.stages]
    variant = run.expansion.get(entry)
    if variant is not None and variant.evaluates:
        return variant.evaluates
    start = start_stage(run, names.index(entry))
    return start.name if start is not None else None


def _better(metric: str, a: float, b: float) -> bool:
    """a is at least as good as b."""
    return a <= b if lower_is_better(metric) else a >= b


def _best_value(metric: str, entries: list[StageStatus]) -> float | None:
    values = [e.metrics[metric] for e in entries if metric in e.metrics]
    if not values:
        return None
    return min(values) if lower_is_better(metric) else max(values)


def gates(run: AlignmentRun, stages: list[StageStatus], entry: StageStatus) -> list[GateResult]:
    out = []
    for g in run.spec.promote.gates:
        value = entry.metrics.get(g.metric)
        if g.at_least_as_good_as is not None:
            threshold = _best_value(g.metric, _entries(run, stages, g.at_least_as_good_as))
            rule = f"atLeastAsGoodAs:{g.at_least_as_good_as}"
            passed = value is not None and threshold is not None and _better(g.metric, value, threshold)
        elif g.min is not None:
            threshold, rule = g.min, "min"
            passed = value is not None and value >= g.min
        else:
            threshold, rule = g.max, "max"
            passed = value is not None and value <= g.max
        out.append(GateResult(metric=g.metric, stage=entry.name, value=value, threshold=threshold, rule=rule,
                              passed=passed))
    return out


def _words(g: GateResult) -> str:
    value = "missing" if g.value is None else f"{g.value:.4g}"
    need = {"min": ">=", "max": "<="}.get(g.rule, ">=" if not lower_is_better(g.metric) else "<=")
    against = "" if g.rule in ("min", "max") else f" ({g.rule.split(':', 1)[1]})"
    threshold = "missing" if g.threshold is None else f"{g.threshold:.4g}"
    return f"{g.metric} {value} {need} {threshold}{against}: {'passed' if g.passed else 'failed'}"


def decide(run: AlignmentRun, stages: list[StageStatus]) -> PromotionStatus | None:
    """The decision, once every stage succeeded (None before, or without spec.promote)."""
    p = run.spec.promote
    if p is None or not stages or any(s.phase != "Succeeded" for s in stages):
        return None
    evals = [s.name for s in run.spec.stages if s.method == "eval"]
    origin = {s.name: getattr(run.expansion.get(s.name), "of", s.name) for s in run.spec.stages}
    eval_name = p.eval or (origin[evals[-1]] if evals else None)
    entries = _entries(run, stages, eval_name) if eval_name else []
    if not entries:
        return None
    metric = p.choose_by or compare_metric(run, entries[0].name)
    sign = 1 if lower_is_better(metric) else -1
    ranked = sorted(entries, key=lambda e: (metric not in e.metrics, sign * e.metrics.get(metric, 0.0)))
    measured = [(e, gates(run, stages, e)) for e in ranked]
    passing = [(e, g) for e, g in measured if all(x.passed for x in g)]
    chosen, results = (passing or measured)[0]
    stage = _evaluated(run, chosen.name)
    by = {s.name: s for s in stages}
    model = by[stage].checkpoint if stage in by else None
    matrix = dict(by[stage].matrix) if stage in by and by[stage].matrix else None
    verdict = "Promoted" if passing else HELD
    shown = "; ".join(_words(g) for g in results)
    which = ", ".join(f"{k} {v}" for k, v in (matrix or {}).items())
    value = f" {metric} {chosen.metrics[metric]:.4g}" if metric in chosen.metrics else ""
    several = (f" ({which + '; ' if which else ''}best of {len(entries)} by {metric}:{value or ' missing'})"
               if len(entries) > 1 else "")
    message = (f"promoted {stage}{several}" + (f": {shown}" if shown else "") if passing else
               f"held: no candidate of {eval_name} passes every gate; best {stage}{several}: {shown}")
    return PromotionStatus(verdict=verdict, eval_stage=eval_name, stage=stage, matrix=matrix,
                           evaluated_by=chosen.name, model=model, chosen_by=metric if len(entries) > 1 else None,
                           candidates=len(entries), gates=results, message=message)


def pending_exports(run: AlignmentRun, promotion: PromotionStatus | None) -> list[str]:
    """The promote.exports URIs a promoted model still needs (none done, or one that failed)."""
    if promotion is None or promotion.verdict != "Promoted" or run.spec.promote is None:
        return []
    done = {e.uri.rstrip("/") for e in promotion.exports if e.digest and not e.error}
    return [x.uri for x in run.spec.promote.exports if x.uri.rstrip("/") not in done]


def exported_condition(run: AlignmentRun, decision: PromotionStatus, old: AlignmentRunStatus, now: str,
                       generation: int | None):
    failed = [e for e in decision.exports if e.error]
    left = pending_exports(run, decision)
    if failed:
        return condition(old.conditions, "Exported", "False", "ExportFailed",
                         "; ".join(f"{e.uri}: {e.error}" for e in failed), now, generation)
    if left:
        return condition(old.conditions, "Exported", "Unknown", "ExportPending", f"exporting {decision.stage} to "
                         + ", ".join(left), now, generation)
    return condition(old.conditions, "Exported", "True", "ExportsComplete", "; ".join(
        f"{e.uri} {e.digest} ({e.bytes} bytes)" for e in decision.exports), now, generation)


def compare_metric(run: AlignmentRun, eval_stage: str) -> str:
    """The metric an eval of several stages sorts them by (eval.compareBy)."""
    spec = next(s for s in run.spec.stages if s.name == eval_stage)
    return (spec.eval.compare_by if spec.eval is not None and spec.eval.compare_by else None) or DEFAULT_COMPARE


DEFAULT_COMPARE = "preference_accuracy"


def apply(run: AlignmentRun, status: AlignmentRunStatus, old: AlignmentRunStatus, now: str,
          generation: int | None) -> AlignmentRunStatus:
    """status with spec.promote's decision: status.promotion, the Promoted condition, and a held run's
    phase (Held), Ready, Reconciling and Stalled conditions, and completion time."""
    if run.spec.promote is None:
        return status
    decision = decide(run, status.stages)
    if decision is None:
        waiting = condition(old.conditions, "Promoted", "Unknown", "AwaitingEvaluation",
                            "promote waits for every stage to succeed", now, generation)
        return status.model_copy(update={"promotion": None, "conditions": [*status.conditions, waiting]})
    promoted = decision.verdict == "Promoted"
    conditions = status.conditions
    if not promoted:  # every stage ran, and the model must not ship: not Ready, Stalled (kstatus Failed)
        held = {"Ready": condition(old.conditions, "Ready", "False", "GatesNotMet", decision.message, now, generation),
                "Reconciling": condition(old.conditions, "Reconciling", "False", "RunHeld",
                                         "every stage ran; promote held the model", now, generation),
                "Stalled": condition(old.conditions, "Stalled", "True", "GatesNotMet", decision.message, now,
                                     generation)}
        conditions = [held.get(c.type, c) for c in conditions]
    conditions = [*conditions, condition(old.conditions, "Promoted", "True" if promoted else "False",
                                         "GatesPassed" if promoted else "GatesNotMet", decision.message, now,
                                         generation)]
    if promoted and run.spec.promote.exports:
        kept = old.promotion.exports if old.promotion is not None and old.promotion.model == decision.model else []
        decision.exports = [e for e in kept if e.uri.rstrip("/") in {x.uri.rstrip("/") for x in run.spec.promote.exports}]
        conditions.append(exported_condition(run, decision, old, now, generation))
    update = {"promotion": decision, "conditions": conditions}
    if promoted and decision.model:  # a sweep's: the promoted variant's model and evaluation, marked in the comparison
        update["model"] = decision.model
        chosen = next((s for s in status.stages if s.name == decision.evaluated_by), None)
        if chosen is not None:
            update["evaluation"] = {"stage": chosen.name, **chosen.metrics}
        update["comparison"] = [r.model_copy(update={"promoted": r.eval_stage == decision.evaluated_by})
                                for r in status.comparison]
    if not promoted:
        update.update(phase=HELD, completion_time=old.completion_time or status.completion_time or now)
    return status.model_copy(update=update)
