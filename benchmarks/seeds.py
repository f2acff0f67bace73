"""Several seeds per setting: mean +- std, and one stated rule for "this difference is noise"."""

import math
import statistics

NOISE_RULE = (
    "a difference counts only if |mean A - mean B| >= 2 x pooled std, "
    "pooled std = sqrt((std_A^2 + std_B^2) / 2) over the seeds (sample std)"
)


def mean_std(values):
    """(mean, sample std); std is None with fewer than two values (no estimate of the noise)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def pooled_std(std_a, std_b):
    if std_a is None or std_b is None:
        return None
    return math.sqrt((std_a**2 + std_b**2) / 2)


def within_noise(mean_a, std_a, mean_b, std_b):
    """True if the two means are within noise of each other, None when a side has a single seed."""
    pooled = pooled_std(std_a, std_b)
    if pooled is None:
        return None
    return abs(mean_a - mean_b) < 2 * pooled


def verdict(mean, std, base_mean, base_std, lower_is_better=True):
    """'better' / 'worse' / 'within noise' / 'n/a (1 seed)' of (mean, std) against the base."""
    same = within_noise(mean, std, base_mean, base_std)
    if same is None:
        return "n/a (1 seed)"
    if same:
        return "within noise"
    return "better" if (mean < base_mean) == lower_is_better else "worse"


def fmt_mean_std(mean, std, spec=".2f"):
    return format(mean, spec) if std is None else f"{format(mean, spec)} ± {format(std, spec)}"


def parse_seeds(text):
    from .cli import UsageError, parse_int_list

    seeds = parse_int_list("--seeds", text)
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text!r}: a seed is repeated")
    return seeds
