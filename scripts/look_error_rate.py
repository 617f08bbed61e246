"""False-verdict rate of a multi-look seed rule under a null effect (simulation).

Rule: judge a claim at the first look's number of paired seeds; while its 95% t interval holds 0,
add seeds and judge again at the next look. With no true effect, how often does any look exclude 0?
A plan tier that followed such a rule lists its `looks`, and the report quotes this rate.
    .venv/bin/python scripts/look_error_rate.py            # looks 3, 5 (the 2022-24 plans' rule); ~2 s
    .venv/bin/python scripts/look_error_rate.py 5 10       # translation's ref tier
"""
import sys

from bench.report.stats import sequential_false_verdict_rate


def main(argv: list[str]) -> None:
    looks = sorted(int(a) for a in argv) if argv else [3, 5]
    if looks[0] < 2:
        raise SystemExit("looks are seed counts of at least 2, e.g. `5 10`")
    print(f"one look at {looks[-1]} seeds: {sequential_false_verdict_rate((looks[-1],)):.4f} (nominal 0.05)")
    print(f"looks at {', '.join(map(str, looks))} (stop at the first that excludes 0): "
          f"{sequential_false_verdict_rate(tuple(looks)):.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
