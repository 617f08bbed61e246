"""False-verdict rate of the ref tier's two-look seed rule under a null effect (simulation).

Rule: judge a claim at 3 paired seeds; if its 95% t interval holds 0, add 2 seeds and judge again
at 5. With no true effect, how often does either look exclude 0?
    .venv/bin/python scripts/two_look_error_rate.py     # ~5 s; prints the rates
"""
import numpy as np
from scipy.stats import t


def excludes_zero(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[1]
    mean, half = x.mean(1), t.ppf(0.975, n - 1) * x.std(1, ddof=1) / np.sqrt(n)
    return mean - half > 0, mean + half < 0


def main(trials: int = 400_000, seed: int = 0) -> None:
    x = np.random.default_rng(seed).standard_normal((trials, 5))
    up3, down3 = excludes_zero(x[:, :3])
    up5, down5 = excludes_zero(x)
    first = up3 | down3
    print(f"one look at 5 seeds: {(up5 | down5).mean():.4f} (nominal 0.05)")
    print(f"two looks (3, then 5 if undecided): {(first | up5 | down5).mean():.4f}; "
          f"false 'reproduced' alone {(up3 | (~first & up5)).mean():.4f}")


if __name__ == "__main__":
    main()
