"""Drift verdicts: live counts (training/drift.py's `Layout`) against the training profile, honest
at every sample size. Shared by the service, its Prometheus rules (deploy/prometheus/, the same
arithmetic in PromQL) and benchmarks/drift_calibration.py (numpy only).

Each feature is tested in bins that the training profile expects to hold at least MIN_EXPECTED
rows of the smallest window (`min_rows`): rarer bins are pooled. That includes the bins training
never saw (gaps in a column that had none, categories outside the profile): a share of 0 in N
training rows only says the true share is below about 3 / N, and a test that took it for 0 would
raise "retrain" on the first rare category of healthy traffic (the missing and unseen shares are
still reported). The test is the two-sample chi-squared test of
homogeneity between the n live rows and the N training rows,

    chi2 = n N sum_i (s_i - r_i)^2 / (a_i + N r_i),   (bins - 1) degrees of freedom,

where a_i is bin i's live count, s_i = a_i / n its live share and r_i its training share. Beside
it, each feature has a second test aimed at the change people look for first: for a numeric
feature the z test of its mean, z = (live mean - training mean) / (training std sqrt(1/n + 1/N));
for a categorical one the largest z of one test bin's share, (s_i - r_i) / sqrt(r_i (1 - r_i)
(1/n + 1/N)) (Bonferroni over its bins). A feature is significant when either test is, each at
alpha / (2 features) (Bonferroni: a false alarm on at most a share alpha of in-distribution
windows, whatever their size; the service divides alpha further over the windows it looks at and
the looks it takes: service/monitor.py). The effect sizes are the ones people read: the
population stability index over the same bins, the mean shift in training standard deviations
(numeric) and the largest change of a test bin's share (categorical). A feature is
    retrain   significant, and PSI >= psi_retrain or |mean shift| >= shift_retrain
              or |share change| >= share_retrain
    warn      significant, and PSI >= psi_warn or |mean shift| >= shift_warn or |share change| >= share_warn
    ok        otherwise: a change too small to matter is not flagged, however significant
and "not_enough_data" below `min_rows` live rows. benchmarks/drift_calibration.py measures the
false-alarm rate, the power and the detection delay.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from training.drift import EPSILON, Layout

VERDICTS = ("ok", "warn", "retrain")
MIN_EXPECTED = 10  # rows a test bin expects at the smallest window: the chi-squared law holds there


@dataclass(frozen=True)
class Settings:
    alpha: float = 0.01         # overall false-alarm rate on in-distribution windows
    min_rows: int = 200         # fewer live rows give "not_enough_data"
    psi_warn: float = 0.1       # the usual PSI reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25 large
    psi_retrain: float = 0.25
    shift_warn: float = 0.25    # mean shift, in training standard deviations
    shift_retrain: float = 0.5
    share_warn: float = 0.05    # a category's (test bin's) share moved by this much: 30% -> 35%
    share_retrain: float = 0.15

    def thresholds(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k not in ("alpha", "min_rows")}


# ---- the chi-squared law, without scipy (the service does not import it) ------------------------

def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X chi-squared with df degrees of freedom: the regularized upper incomplete
    gamma function Q(df/2, x/2), by its series below a + 1 and its continued fraction above."""
    if x <= 0:
        return 1.0
    a, x = df / 2.0, x / 2.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:  # P by the series, Q = 1 - P
        term = total = 1.0 / a
        k = a
        while abs(term) > abs(total) * 1e-15:
            k += 1
            term *= x / k
            total += term
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300  # modified Lentz for the continued fraction of Q
    b, c, d = x + 1 - a, 1 / tiny, 1 / (x + 1 - a)
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h * math.exp(log_front)


def chi2_isf(p: float, df: int) -> float:
    """The x with chi2_sf(x, df) = p, by bisection (once per feature, at start-up)."""
    low, high = 0.0, max(1.0, 2.0 * df)
    while chi2_sf(high, df) > p:
        low, high = high, 2 * high
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if chi2_sf(mid, df) > p else (low, mid)
    return high


# ---- the bins a feature is tested in -------------------------------------------------------------

def pool(shares: np.ndarray, min_share: float, order: np.ndarray) -> np.ndarray:
    """The test bin of each profile bin. Bins with a share below min_share (those training never
    saw included) form one pool, with the next smallest bins until it holds min_share; the others
    stay alone. The pool is one: split by training counts, its parts would be biased (the rarest
    categories of a training sample are rarer there than in truth). Where that leaves one bin
    (every bin rare: a small window), consecutive bins in `order`, an order that does not depend
    on the counts, are pooled until each pool holds min_share. A feature keeps two test bins at
    least (a flag set in 1% of training rows, a constant column: the largest bin against the rest),
    even where the rest expects fewer rows."""
    ranked = list(np.argsort(shares, kind="stable"))
    small = [i for i in ranked if shares[i] < min_share]
    rest = [i for i in ranked if shares[i] >= min_share]
    while small and shares[small].sum() < min_share and rest:
        small.append(rest.pop(0))
    group = np.arange(len(shares))
    group[small] = small[0] if small else 0
    if not rest:
        g, total = 0, 0.0
        for i in order:
            if total >= min_share:
                g, total = g + 1, 0.0
            group[i], total = g, total + shares[i]
        if total < min_share and g > 0:  # a last pool short of min_share joins the one before
            group[group == g] = g - 1
    if len(shares) > 1 and len(set(group.tolist())) < 2:  # never one test bin: nothing could move it
        group = np.where(np.arange(len(shares)) == np.argmax(shares), 0, 1)
    _, first, inverse = np.unique(group, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse]  # numbered in the order of their first bins


@dataclass
class FeatureTest:
    """One feature's bins in the Layout's counts vector, its test bins and its critical values."""
    name: str
    kind: str
    slots: np.ndarray       # where the profile bins' counts sit (numeric: the bins, then missing)
    group: np.ndarray       # the test bin of each profile bin
    shares: np.ndarray      # the training share of each test bin
    labels: list[str]       # a readable name per test bin
    critical: float         # chi2 at which the feature is significant (inf: nothing to test)
    profile_shares: np.ndarray  # the training share of each profile bin (for drawing)
    critical_z: float = math.inf  # |z| at which its mean (numeric) or one bin's share is significant

    def bin_counts(self, counts: np.ndarray) -> np.ndarray:
        return np.bincount(self.group, counts[self.slots], minlength=len(self.shares))


def profile_bins(feature: dict, offset: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A feature's profile bins: their slots in the counts vector, training shares and names."""
    k = len(feature["freqs"])
    if feature["kind"] == "numeric":
        bounds = ["-inf", *(f"{e:.4g}" for e in feature["edges"]), "inf"]
        names = [f"{a}..{b}" for a, b in zip(bounds[:-1], bounds[1:])] + ["missing"]
        slots = np.append(np.arange(offset + 5, offset + 5 + k), offset + 4)
        shares = np.append(np.asarray(feature["freqs"]) * (1 - feature["missing"]), feature["missing"])
    else:
        names = [*map(str, feature["categories"]), "other"]
        slots = np.arange(offset + 1, offset + 2 + k)
        shares = np.append(feature["freqs"], feature["other"])
    return slots, shares, names


def z_critical(alpha: float) -> float:
    """The |z| of a two-sided normal test at alpha (the chi-squared law with one degree of freedom)."""
    return math.sqrt(chi2_isf(alpha, 1))


def plan(layout: Layout, settings: Settings, alpha: float | None = None) -> list[FeatureTest]:
    """Each feature's tests. `alpha`: the false-alarm rate of one comparison of all features
    (default settings.alpha); Bonferroni over the features and their two tests."""
    min_share = MIN_EXPECTED / settings.min_rows
    per_test = (settings.alpha if alpha is None else alpha) / max(1, 2 * len(layout.features))
    tests = []
    for f, offset in zip(layout.features, layout.offsets):
        slots, shares, names = profile_bins(f, offset)
        order = np.arange(len(shares)) if f["kind"] == "numeric" else np.argsort(names, kind="stable")
        group = pool(shares, min_share, order)
        members = [[names[i] for i in np.flatnonzero(group == g)] for g in range(group.max() + 1)]
        labels = [m[0] if len(m) == 1 else f"{m[0]} + {len(m) - 1} more" for m in members]
        df = len(members) - 1
        bins = 1 if f["kind"] == "numeric" else len(members)  # the mean, or each bin's share
        tests.append(FeatureTest(f["name"], f["kind"], slots, group,
                                 np.bincount(group, shares), labels,
                                 chi2_isf(per_test, df) if df >= 1 else math.inf, shares,
                                 z_critical(per_test / bins) if df >= 1 else math.inf))
    return tests


# ---- the comparison -------------------------------------------------------------------------

def psi(expected: np.ndarray, observed: np.ndarray) -> float:
    """Population stability index between two sets of bin shares."""
    e, o = np.maximum(expected, EPSILON), np.maximum(observed, EPSILON)
    return float(np.sum((o - e) * np.log(o / e)))


def chi2_statistic(live: np.ndarray, shares: np.ndarray, reference_rows: float) -> float:
    """The two-sample chi-squared statistic (module docstring); bins empty on both sides add 0."""
    n, N = live.sum(), reference_rows
    if n == 0:
        return 0.0
    denominator = live + N * shares
    seen = denominator > 0
    return float(n * N * np.sum((live[seen] / n - shares[seen]) ** 2 / denominator[seen]))


def worst(verdicts) -> str:
    return max(verdicts, key=VERDICTS.index, default="ok")


class Comparison:
    """Live counts of a Layout against its training profile, with verdicts. `alpha`: the
    false-alarm rate of one comparison (default settings.alpha)."""

    def __init__(self, layout: Layout, settings: Settings, reference_rows: int | None,
                 alpha: float | None = None):
        self.layout, self.settings = layout, settings
        self.tests = plan(layout, settings, alpha)
        # Profiles written before the row count was recorded: the training shares taken as exact.
        self.reference_rows = float(reference_rows or 1e12)

    def mean_shift(self, feature: dict, counts: np.ndarray, offset: int) -> dict:
        seen, above, below, squares = map(float, counts[offset:offset + 4])
        if not seen:
            return {"mean_shift": None, "live_mean": None, "live_std": None}
        deviation = (above - below) / seen
        return {"mean_shift": deviation / (feature["std"] or 1.0),
                "live_mean": feature["mean"] + deviation,
                "live_std": math.sqrt(max(squares / seen - deviation ** 2, 0.0))}

    def z(self, test: FeatureTest, f: dict, offset: int, counts: np.ndarray, live: np.ndarray) -> float:
        """The feature's second test statistic (module docstring): its mean's z (numeric), or the
        largest |z| of a test bin's share (categorical)."""
        n, N = live.sum(), self.reference_rows
        if not n:
            return 0.0
        if f["kind"] == "numeric":
            seen, above, below = map(float, counts[offset:offset + 3])
            if not seen or not f["std"]:
                return 0.0
            return abs((above - below) / seen) / (f["std"] * math.sqrt(1 / seen + 1 / N))
        r = test.shares
        spread = np.sqrt(np.maximum(r * (1 - r), 1e-12) * (1 / n + 1 / N))
        return float(np.max(np.abs(live / n - r) / spread))

    def feature(self, test: FeatureTest, f: dict, offset: int, counts: np.ndarray, rows: int) -> dict:
        s = self.settings
        live = test.bin_counts(counts)
        n = live.sum()
        distance = psi(test.shares, live / n) if n else None
        statistic = chi2_statistic(live, test.shares, self.reference_rows)
        z = self.z(test, f, offset, counts, live)
        df = len(test.shares) - 1
        share_change = float(np.max(np.abs(live / n - test.shares))) if n and f["kind"] == "categorical" else None
        entry = {"name": f["name"], "kind": f["kind"], "psi": distance, "mean_shift": None,
                 "share_change": share_change, "statistic": statistic, "df": df,
                 "critical": test.critical, "z": z, "critical_z": test.critical_z,
                 "p_value": chi2_sf(statistic, df) if df >= 1 else 1.0}
        if f["kind"] == "numeric":
            entry.update(self.mean_shift(f, counts, offset), train_mean=f["mean"], train_std=f["std"],
                         edges=f["edges"], missing=float(counts[offset + 4] / rows) if rows else None)
        else:
            entry.update(categories=f["categories"],
                         unseen=float(counts[offset + 1 + len(f["freqs"])] / rows) if rows else None)
        shift, moved = abs(entry["mean_shift"] or 0.0), share_change or 0.0
        significant = rows > 0 and (statistic >= test.critical or z >= test.critical_z)
        if rows < s.min_rows:
            verdict = "not_enough_data"
        elif significant and (distance >= s.psi_retrain or shift >= s.shift_retrain or moved >= s.share_retrain):
            verdict = "retrain"
        elif significant and (distance >= s.psi_warn or shift >= s.shift_warn or moved >= s.share_warn):
            verdict = "warn"
        else:
            verdict = "ok"
        return {**entry, "significant": bool(significant), "verdict": verdict,
                "bins": test.labels, "train_shares": test.shares.tolist(), "live_counts": live.tolist(),
                "train_freqs": test.profile_shares.tolist(),
                "live_freqs": (counts[test.slots] / max(rows, 1)).tolist()}

    def compare(self, counts: np.ndarray) -> dict:
        """Each feature's test, effect sizes and verdict; the overall verdict is the worst
        feature's. `counts` is the Layout's vector, returned too so that windows can be added."""
        rows = int(counts[0])
        features = [self.feature(t, f, offset, counts, rows)
                    for t, f, offset in zip(self.tests, self.layout.features, self.layout.offsets)]
        enough = rows >= self.settings.min_rows
        return {"rows": rows, "verdict": worst(f["verdict"] for f in features) if enough else "not_enough_data",
                "features": features, "counts": counts.tolist()}
