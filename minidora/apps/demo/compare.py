"""What the seeds can tell apart: the mean and range of a metric over seeds, and the verdicts.

A method's number is the mean over the seeds it ran, and its spread is the range of those seeds,
[min, max]. Two methods are told apart only when their ranges do not overlap: every seed of one
did better than every seed of the other. Where the ranges overlap (or touch), the table gives
them the same rank and the comparison says "not distinguishable here".

Why the range, and not a t or bootstrap interval of the mean: with a handful of seeds a t interval
leans on a normal distribution that a bimodal accuracy (a run finds the mapping within the budget
or does not) does not have, and it spills outside [0, 1]; a bootstrap of four values has few
distinct resamples and its interval is close to the range anyway. The range makes no assumption,
and non-overlap has a plain meaning: if two methods made no difference, so that the 2n seeds'
results were exchangeable, the chance that all n of one land above all n of the other (either
way round) is 2 / C(2n, n): 0.10 for 3 seeds, 0.029 for 4, 0.008 for 5 (:func:`chance_apart`).
It is the exact two-sided Mann-Whitney test at its most extreme outcome.
"""

from __future__ import annotations

import math
import statistics

__all__ = ["METRICS", "stats", "apart", "chance_apart", "ranks", "verdict", "pairs",
           "comparison_lines"]

# The held-out metrics the table ranks: (key in a run's results, short name, True if higher is
# better).
METRICS = {"accuracy": ("final_accuracy", "acc", True),
           "held_out_loss": ("final_held_out_loss", "loss", False)}


def stats(values: list[float]) -> dict:
    """``mean``, ``min``, ``max``, sample ``std`` (0 for one value), count ``n`` of ``values``
    and ``non_finite``, how many are NaN or infinite (a run that diverged): then the mean, min,
    max and std are NaN, and the row is neither ranked nor compared."""
    if not values:
        raise ValueError("values: got []; expected one or more numbers")
    bad = sum(not math.isfinite(v) for v in values)
    if bad:
        nan = float("nan")
        return {"mean": nan, "min": nan, "max": nan, "std": nan, "n": len(values),
                "non_finite": bad}
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values),
            "non_finite": 0}


def apart(a: dict, b: dict, higher_is_better: bool) -> int:
    """+1 if every value of ``a`` is better than every value of ``b`` (the ranges [min, max] of
    two :func:`stats` do not overlap, ``a`` on the better side), -1 the other way round, 0 if
    the ranges overlap or touch (or one is NaN: every comparison with NaN is false)."""
    if a["min"] > b["max"]:
        return 1 if higher_is_better else -1
    if a["max"] < b["min"]:
        return -1 if higher_is_better else 1
    return 0


def chance_apart(n: int, m: int | None = None) -> float:
    """The chance that n values of one method and m of another (m = n if None) have disjoint
    ranges, either way round, when the method makes no difference: 2 / C(n + m, n)."""
    m = n if m is None else m
    return 2 / math.comb(n + m, n)


def ranks(summary: dict[str, dict], higher_is_better: bool) -> dict[str, str]:
    """A rank per name of ``summary`` ({name: :func:`stats`}), 1 the best, tied names marked
    ``=``, ``-`` for a name whose range is NaN (a seed diverged). The names whose ranges
    overlap, directly or through others, form one group (the ranges are merged as intervals on
    a line, lowest first); the merged ranges of two groups do not overlap, so any two names in
    different groups are apart (:func:`apart`), and the names of one group share a rank."""
    groups: list[list[str]] = []
    top = -math.inf                     # the highest end of the current group's merged range
    finite = [k for k in summary if math.isfinite(summary[k]["min"])]
    for name in sorted(finite, key=lambda k: (summary[k]["min"], summary[k]["max"])):
        s = summary[name]
        if groups and s["min"] <= top:
            groups[-1].append(name)
        else:
            groups.append([name])
        top = max(top, s["max"])
    if higher_is_better:
        groups.reverse()
    out = {k: "-" for k in summary}
    for i, group in enumerate(groups, start=1):
        for name in group:
            out[name] = f"{i}=" if len(group) > 1 else str(i)
    return out


def verdict(a: str, b: str, summary: dict[str, dict], higher_is_better: bool) -> str:
    """``"a better"``, ``"b better"``, ``"not distinguishable here"`` (names as given), or
    ``"cannot tell: a seed of a diverged"`` where a seed gave NaN or an infinite value."""
    for name in (a, b):
        if summary[name].get("non_finite"):
            return f"cannot tell: a seed of {name} diverged"
    side = apart(summary[a], summary[b], higher_is_better)
    return f"{a} better" if side > 0 else f"{b} better" if side < 0 else "not distinguishable here"


def pairs(names: list[str], baseline: str) -> list[tuple[str, str, str]]:
    """The comparisons that matter among ``names``, as (what it asks, a, b): full fine-tuning
    against each adapter, each method against ``baseline`` (the pretrained model), each 4-bit
    method against its 16-bit one, DoRA against LoRA (16-bit, else 4-bit)."""
    adapters = [m for m in names if m != "full"]
    out = [("full vs adapters", "full", m) for m in adapters if "full" in names]
    out += [("fine-tuned vs pretrained", m, baseline) for m in names]
    out += [("4-bit vs 16-bit", q, q[1:]) for q in ("qlora", "qdora")
            if q in names and q[1:] in names]
    for d, lo in (("dora", "lora"), ("qdora", "qlora")):
        if d in names and lo in names:
            out.append(("DoRA vs LoRA", d, lo))
            break
    return out


def comparison_lines(summary: dict[str, dict[str, dict]], names: list[str],
                     baseline: str) -> list[str]:
    """One line per pair of :func:`pairs`, with the verdict for each metric of :data:`METRICS`.

    Args:
        summary: {metric: {name: :func:`stats`}} for every metric of :data:`METRICS`, the
            baseline included among the names.
        names: the fine-tuning methods, in table order.
        baseline: the name of the pretrained model's row.
    """
    rows = [[what, f"{a} vs {b}",
             *(f"{METRICS[metric][1]}: {verdict(a, b, summary[metric], METRICS[metric][2])}"
               for metric in METRICS)] for what, a, b in pairs(names, baseline)]
    if not rows:
        return []
    for prev, row in zip(rows[-2::-1], rows[:0:-1], strict=True):   # the question once a group
        if row[0] == prev[0]:
            row[0] = ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]
