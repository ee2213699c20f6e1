"""Choose the default one-shot FM variant on DEV data only (issue 24) and write the table that chose it.

    python experiments/fm_dev_select.py [--out experiments/results/fm_dev_select.md]

Reads the dev evaluations of ``experiments/fm_variants.sh`` (``fm_dev_g16``, ``fm_dev_g32`` when present,
``fm_dev_ceiling_g16``). The rule, fixed before the val tables were computed: among the variants, the one
with the highest macro-average FM mDSC over the dev sets, provided it leaves at most 5% of the CVC dev
images without a positive prompt (a start with no positive on the object cannot be repaired by removal);
the grid is chosen by the same macro average. Val splits are never read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = {"feature_matching": "nearest", "fm_paper": "paper", "fm_mutual": "mutual", "fm_gfsam": "gfsam"}


def _load(path: Path) -> dict | None:
    f = path / "results.json"
    return json.loads(f.read_text()) if f.is_file() else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="experiments/results")
    p.add_argument("--out", default="experiments/results/fm_dev_select.md")
    a = p.parse_args()
    root = Path(a.results)
    lines = ["# Default FM variant chosen on dev data (issue 24)", "", __doc__.split("\n\n")[2].strip(), ""]
    scores: dict[tuple[str, int], float] = {}
    nopos_cvc: dict[tuple[str, int], float] = {}
    for grid in (16, 32):
        res = _load(root / f"fm_dev_g{grid}")
        if res is None:
            continue
        sets = [d["dataset"]["name"] for d in res["datasets"]]
        lines += [
            f"## G = {grid}",
            "",
            "mDSC [95% CI] (no-positive images / n); `oracle_label(X)` mDSC in the last columns.",
            "",
            "| data set | "
            + " | ".join(ROWS.values())
            + " | "
            + " | ".join(f"label({v})" for v in ROWS.values())
            + " | PerSAM | gf_sam |",
            "|---" * (len(sets) and 2 * len(ROWS) + 3) + "|",
        ]
        for d in res["datasets"]:
            ms = d["methods"]
            cells = []
            for m, v in ROWS.items():
                e = ms[m]
                nop = len(e.get("no_positive_images", []))
                cells.append(
                    f"{e['mdsc']:.3f} [{e['mdsc_ci'][0]:.3f}, {e['mdsc_ci'][1]:.3f}] ({nop}/{e['n']})"
                )
                if d["dataset"]["name"].startswith("cvc"):
                    nopos_cvc[(v, grid)] = nop / e["n"]
            for m in ROWS:
                e = ms.get(f"oracle_label({m})")
                cells.append(f"{e['mdsc']:.3f}" if e and "mdsc" in e else "—")
            for m in ("persam", "gf_sam"):
                e = ms.get(m)
                cells.append(f"{e['mdsc']:.3f}" if e and "mdsc" in e else "—")
            lines.append(
                f"| {d['dataset']['name']} (n = {ms['feature_matching']['n']}) | " + " | ".join(cells) + " |"
            )
        for m, v in ROWS.items():
            scores[(v, grid)] = sum(d["methods"][m]["mdsc"] for d in res["datasets"]) / len(res["datasets"])
        lines += [
            "",
            "Macro-average FM mDSC over the dev sets: "
            + ", ".join(f"{v} {scores[(v, grid)]:.3f}" for v in ROWS.values()),
            "",
        ]
    ceil = _load(root / "fm_dev_ceiling_g16")
    if ceil is not None:
        lines += ["## Removal ceilings, CVC-ClinicDB dev, G = 16", ""]
        for d in ceil["datasets"]:
            for m, e in d["methods"].items():
                if "mdsc" in e:
                    lines.append(f"- `{m}`: {e['mdsc']:.3f} [{e['mdsc_ci'][0]:.3f}, {e['mdsc_ci'][1]:.3f}]")
        lines.append("")
    eligible = {k: s for k, s in scores.items() if nopos_cvc.get(k, 1.0) <= 0.05}
    if eligible:
        (variant, grid), best = max(eligible.items(), key=lambda kv: kv[1])
        lines += [
            f"**Chosen: `{variant}` at G = {grid}** (macro-average dev FM mDSC {best:.3f}; CVC dev images without a positive: {100 * nopos_cvc[(variant, grid)]:.0f}%).",
            "",
        ]
    else:
        lines += ["**No variant meets the no-positive rule on CVC dev.**", ""]
    out = Path(a.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
