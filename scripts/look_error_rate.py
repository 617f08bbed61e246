"""False-verdict rate of a multi-look seed rule under a null effect (simulation).

Rule: judge a claim at the first look's number of paired seeds; while its 95% t interval holds 0,
add seeds and judge again at the next look. With no true effect, how often does any look exclude 0?
    .venv/bin/python scripts/look_error_rate.py            # looks 3, 5 (the ref tier's rule); ~5 s
    .venv/bin/python scripts/look_error_rate.py 3 5 10     # translation: 3 (interim), 5, then 10
"""
import sys

import numpy as np
from scipy.stats import t


def excludes_zero(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[1]
    mean, half = x.mean(1), t.ppf(0.975, n - 1) * x.std(1, ddof=1) / np.sqrt(n)
    return mean - half > 0, mean + half < 0


def false_verdict_rates(looks: list[int], trials: int = 400_000, seed: int = 0) -> tuple[float, float, float]:
    """(one look at the last n, any look excludes 0, a false 'reproduced' at the look that stops)."""
    x = np.random.default_rng(seed).standard_normal((trials, max(looks)))
    decided = np.zeros(trials, bool)
    false_up = np.zeros(trials, bool)
    for n in looks:
        up, down = excludes_zero(x[:, :n])
        false_up |= ~decided & up
        decided |= up | down
    up_last, down_last = excludes_zero(x)
    return float((up_last | down_last).mean()), float(decided.mean()), float(false_up.mean())


def main(argv: list[str]) -> None:
    looks = sorted(int(a) for a in argv) if argv else [3, 5]
    if len(looks) < 1 or looks[0] < 2:
        raise SystemExit("looks are seed counts of at least 2, e.g. `3 5 10`")
    one, any_look, up = false_verdict_rates(looks)
    print(f"one look at {looks[-1]} seeds: {one:.4f} (nominal 0.05)")
    print(f"looks at {', '.join(map(str, looks))} (stop at the first that excludes 0): {any_look:.4f}; "
          f"false 'reproduced' alone {up:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
