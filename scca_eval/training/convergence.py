"""Has the validation loss flattened? The rule training.json reports as ``convergence``.

The rule compares the last tenth of the run with the tenth before it. Of a run of S
steps, with T = max(1, S // 10) steps to a tenth, the *last tenth* is the validation
points at steps in (S − T, S] and the *previous tenth* those in (S − 2T, S − T]. Every
point scores the same K windows, so the comparison is paired by window: for each window w,

    d_w = (mean loss of w over the last tenth's points) − (same over the previous tenth's)

and the change is the mean of the d_w, with standard error sd(d_w) / sqrt(K). The run
has *flattened* (``converged: true``) when |change| < 2 standard errors: the last tenth
differs from the one before by less than the window-to-window noise of that difference.
Pairing by window removes what the windows differ in by themselves (one book is harder
than another), which would otherwise hide any change.

The rule needs a point in each of the two tenths (``--eval-every`` at most T) and at
least two windows; without them ``converged`` is null and ``reason`` says why.
"""

from __future__ import annotations

import math
import statistics

RULE = ("flattened when the mean validation loss over the last tenth of the run's steps differs from the mean "
        "over the tenth before by less than 2 standard errors of that change, paired by validation window")


def convergence(curve: list[dict], steps: int) -> dict:
    """The rule applied to the validation points ``curve`` of a run of ``steps`` steps."""
    tenth = max(1, steps // 10)
    last = [point for point in curve if steps - tenth < point["step"] <= steps]
    previous = [point for point in curve if steps - 2 * tenth < point["step"] <= steps - tenth]
    result = {"rule": RULE, "converged": None, "last_tenth_steps": [p["step"] for p in last],
              "previous_tenth_steps": [p["step"] for p in previous]}
    if not last or not previous:
        result["reason"] = (f"no validation point in {'the last' if not last else 'the previous'} tenth of the "
                            f"{steps} steps: give --eval-every {tenth} or less")
        return result
    windows = len(last[0]["window_losses"])
    if windows < 2:
        result["reason"] = "one validation window has no spread to judge by: give --eval-tokens of 2 windows or more"
        return result

    def per_window_mean(points):
        return [statistics.fmean(point["window_losses"][w] for point in points) for w in range(windows)]

    last_means, previous_means = per_window_mean(last), per_window_mean(previous)
    differences = [a - b for a, b in zip(last_means, previous_means)]
    change = statistics.fmean(differences)
    standard_error = statistics.stdev(differences) / math.sqrt(windows)
    converged = abs(change) < 2 * standard_error
    result.update({
        "converged": converged,
        "last_tenth_loss": statistics.fmean(last_means),
        "previous_tenth_loss": statistics.fmean(previous_means),
        "change": change,
        "standard_error": standard_error,
        "windows": windows,
        "direction": "flat" if converged else ("falling" if change < 0 else "rising"),
    })
    return result
