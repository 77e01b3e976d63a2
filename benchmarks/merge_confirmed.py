"""Merge into a config folder the re-tuned entries that ``gpu_confirm_retune.sh`` confirmed.

An entry is confirmed when its interleaved timing against the shipped entry
(``close_configs.py``) was at least 1% faster by the median of the per-round ratios and faster
in every round. Each confirmed batch size goes in with ``moetune export-configs --merge
--batch-sizes``, from the sweep journals of that table (``NAME-m*.jsonl.gz`` in JOURNALS).

Usage: python benchmarks/merge_confirmed.py CONFIRM_DIR JOURNALS CONFIGS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moetune.export import best_entries, export_configs

sys.path.insert(0, str(Path(__file__).parent))
from close_configs import parse  # a script beside this one

GAIN = 0.99  # the median per-round ratio new / shipped must be at most this


def confirmed(point: dict) -> bool:
    _, new, _ = point["rows"]  # shipped, re-tuned, shipped again
    return new["ratio_median"] <= GAIN and new["ratio_max"] < 1.0


def main(confirm_dir: Path, journals: Path, configs: Path) -> None:
    for path in sorted(confirm_dir.glob("*.json")):
        points = json.loads(path.read_text())["points"]
        keep = [p["M"] for p in points if confirmed(p)]
        for p in points:
            _, new, again = p["rows"]
            print(
                f"{path.stem:<32} M={p['M']:<3} x{new['ratio_median']:.3f} "
                f"({new['ratio_min']:.3f}-{new['ratio_max']:.3f}), shipped again "
                f"x{again['ratio_median']:.3f}: {'merge' if p['M'] in keep else 'keep shipped'}"
            )
        if keep:
            sources = sorted(journals.glob(f"{path.stem}-m*.jsonl.gz"))
            if not sources:
                raise SystemExit(f"Error: no journals {path.stem}-m*.jsonl.gz in {journals}")
            _, best = best_entries(sources)
            for p in points:  # the journals' entry must be the config the timing confirmed
                if p["M"] in keep and best.get(p["M"]) != parse(p["rows"][1]["config"]):
                    raise SystemExit(
                        f"Error: {path.stem} M={p['M']}: the journals' entry "
                        f"{best.get(p['M'])} is not {p['rows'][1]['config']}"
                    )
            res = export_configs(sources, configs, merge=True, batch_sizes=keep)
            for w in res.warnings:
                print(f"  warning: {w}")
            print(f"  merged M={keep} into {res.paths[0]}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*(Path(a) for a in sys.argv[1:]))
