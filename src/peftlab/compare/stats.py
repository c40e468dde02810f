"""Numbers with their uncertainty: intervals over seeds, and whether a score is above the trivial baseline.

A comparison at a small budget is noisy: the same method moves points between seeds, and a method
that learned nothing scores exactly the majority class. So every score is reported against the task's
trivial baseline (:mod:`peftlab.compare.baseline`) and, with several seeds, with a 95% interval.

* :func:`seed_interval`: mean, standard deviation and the two-sided 95% t-interval over seeds
  (Student's t with n-1 degrees of freedom: seeds are few, so the normal approximation would be
  too narrow).
* :func:`no_better_than_baseline`: the one check that compare and ``peftlab train`` share. A score is
  "no better than the baseline" when it is not above it with 95% confidence: with two or more seeds,
  when the interval's lower end (upper end for lower-is-better metrics) does not clear the baseline;
  with one seed, by a one-sided test on the dev set: the exact binomial test of the accuracy against
  the baseline's accuracy, Matthews correlation against 0 (``MCC * sqrt(n)`` is asymptotically
  standard normal under independence), Pearson/Spearman against the baseline's correlation (Fisher's
  z). A score whose point estimate is not above the baseline is flagged whatever the test.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

CONFIDENCE = 0.95
ALPHA = 0.05  # one-sided significance of "above the baseline"
CORRELATION_METRICS = ("pearson", "spearman")


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def seed_interval(values, confidence: float = CONFIDENCE) -> dict[str, Any] | None:
    """``{"mean", "sd", "low", "high", "n"}`` of the finite ``values``; sd and the interval need two or more."""
    numbers = [float(v) for v in values if finite(v)]
    if not numbers:
        return None
    mean = statistics.fmean(numbers)
    if len(numbers) < 2:
        return {"mean": mean, "sd": None, "low": None, "high": None, "n": 1}
    from scipy.stats import t

    sd = statistics.stdev(numbers)
    half = float(t.ppf(1 - (1 - confidence) / 2, len(numbers) - 1)) * sd / math.sqrt(len(numbers))
    return {"mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "n": len(numbers)}


def intervals_overlap(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Do two rows' 95% intervals (``metric_ci_low``/``metric_ci_high``) overlap? False when either has none."""
    if not a or not b:
        return False
    bounds = (a.get("metric_ci_low"), a.get("metric_ci_high"), b.get("metric_ci_low"), b.get("metric_ci_high"))
    if not all(finite(x) for x in bounds):
        return False
    return bounds[0] <= bounds[3] and bounds[2] <= bounds[1]


@dataclass
class Verdict:
    """Is a score above the trivial baseline with confidence? ``no_better`` None: not tested."""

    no_better: bool | None
    test: str  # which check decided: "point estimate", "95% t-interval over 3 seeds", "one-sided binomial", ...
    p_value: float | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def no_better_than_baseline(metric_name: str, value, baseline, n: int | None = None, *, higher_is_better: bool = True,
                            seed_values=None, metrics: dict[str, Any] | None = None,
                            baseline_metrics: dict[str, Any] | None = None, alpha: float = ALPHA) -> Verdict:
    """Is ``value`` (the dev ``metric_name``, on ``n`` dev examples) no better than ``baseline``?

    ``seed_values``: the metric of each seed (two or more: the interval decides). ``metrics`` and
    ``baseline_metrics``: every dev metric of the run and of the baseline (an F1 task is tested on its
    accuracy as well). Returns a :class:`Verdict`; ``no_better`` is None when there is no baseline or no
    test for this metric with one seed (run more seeds).
    """
    if not finite(value) or not finite(baseline):
        return Verdict(None, "none", detail="no trivial baseline for this task" if not finite(baseline) else "no score")
    sign = 1.0 if higher_is_better else -1.0
    if sign * (value - baseline) <= 0:
        return Verdict(True, "point estimate",
                       detail=f"{metric_name} {value:.4f} is not above the baseline's {baseline:.4f}")
    seeds = [float(v) for v in (seed_values or []) if finite(v)]
    if len(seeds) >= 2:
        interval = seed_interval(seeds)
        edge = interval["low"] if higher_is_better else interval["high"]
        clears = sign * (edge - baseline) > 0
        return Verdict(not clears, f"95% t-interval over {len(seeds)} seeds",
                       detail=f"interval [{interval['low']:.4f}, {interval['high']:.4f}] "
                              f"{'clears' if clears else 'includes or falls below'} the baseline {baseline:.4f}")
    if not n or n < 2:
        return Verdict(None, "none", detail="one seed and no dev size: run --repeats 2 or more for an interval")
    metrics, baseline_metrics = metrics or {}, baseline_metrics or {}
    if metric_name == "mcc":
        from scipy.stats import norm

        z = (value - baseline) * math.sqrt(n)
        p = float(norm.sf(z))
        return _tested(p, alpha, "one-sided z test of MCC (MCC·√n)", f"MCC {value:.4f} on {n} dev examples")
    if metric_name in CORRELATION_METRICS and n > 3 and abs(value) < 1 and abs(baseline) < 1:
        from scipy.stats import norm

        z = (math.atanh(value) - math.atanh(baseline)) * math.sqrt(n - 3)
        p = float(norm.sf(z))
        return _tested(p, alpha, "one-sided Fisher z test", f"{metric_name} {value:.4f} on {n} dev examples")
    accuracy, base_accuracy = metrics.get("accuracy", value if metric_name == "accuracy" else None), \
        baseline_metrics.get("accuracy", baseline if metric_name == "accuracy" else None)
    if finite(accuracy) and finite(base_accuracy) and higher_is_better:
        if accuracy <= base_accuracy:
            return Verdict(True, "point estimate", detail=f"accuracy {accuracy:.4f} is not above the baseline's "
                                                          f"{base_accuracy:.4f}")
        from scipy.stats import binomtest

        correct = int(round(accuracy * n))
        p = float(binomtest(correct, n, min(max(base_accuracy, 0.0), 1.0), alternative="greater").pvalue) \
            if base_accuracy < 1 else 1.0
        return _tested(p, alpha, "one-sided exact binomial test of the accuracy",
                       f"{correct}/{n} correct against the baseline's {base_accuracy:.4f}")
    return Verdict(None, "none", detail=f"no one-seed test for {metric_name}: run --repeats 2 or more for an interval")


def _tested(p: float, alpha: float, test: str, what: str) -> Verdict:
    above = p < alpha
    return Verdict(not above, test, p, f"{what}: p = {p:.3g} ({'above' if above else 'not above'} the baseline "
                                       f"at {1 - alpha:.0%} confidence)")


def baseline_warning(task, train_raw, dev_raw, label_names, metrics: dict[str, Any]) -> str | None:
    """The end of ``peftlab train``: a warning sentence when the dev score is no better than the trivial baseline.

    ``task``, ``train_raw``, ``dev_raw`` and ``label_names`` as :class:`peftlab.training.Prepared` holds
    them; ``metrics``: the final dev metrics. None when the score is above the baseline (or there is none).
    """
    from peftlab.compare.baseline import trivial_baseline

    reference = trivial_baseline(task, train_raw, dev_raw, label_names)
    if reference is None:
        return None
    value = metrics.get(task.metric_name)
    verdict = no_better_than_baseline(task.metric_name, value, reference["metric"], len(dev_raw),
                                      higher_is_better=task.higher_is_better, metrics=metrics,
                                      baseline_metrics=reference["metrics"])
    if not verdict.no_better:
        return None
    return (f"Warning: dev {task.metric_name} {value:.4f} is no better than the trivial baseline "
            f"({reference['description']}: {reference['metric']:.4f}); {verdict.test}: {verdict.detail}. "
            "The model may not have learned the task: try more data or epochs, another learning rate, or more seeds.")


__all__ = ["CONFIDENCE", "ALPHA", "Verdict", "finite", "seed_interval", "intervals_overlap", "no_better_than_baseline",
           "baseline_warning"]
