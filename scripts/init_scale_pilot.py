"""How fast one arm of a plan learns at several init scales (``init_scale``: weights ~ truncated
normal, sigma = sqrt(scale / fan_in); the Switch paper recommends 0.1 for sparse models, 1.0 is the
usual default): scripts/settings_pilot.py with one ``init_scale=S`` variant per scale.

    .venv/bin/python scripts/init_scale_pilot.py translation dense 0.1 1.0 --steps 1200   # ~7 min on 2 cores
    .venv/bin/python scripts/init_scale_pilot.py switch-vs-dense dense 0.1 1.0 --steps 450
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from settings_pilot import main as settings_pilot  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan")
    ap.add_argument("arm")
    ap.add_argument("scales", nargs="+", type=float)
    args, rest = ap.parse_known_args()
    variants = [a for s in args.scales for a in ("--variant", f"init_scale={s:g}")]
    settings_pilot([args.plan, args.arm, *variants, *rest], prog="init_scale_pilot.py")


if __name__ == "__main__":
    main()
