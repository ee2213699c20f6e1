"""Choose the defender's stop threshold ``min_q`` on the DEV splits and write the file that ships (issue 23).

    python experiments/defender_dev_select.py --defender runs/x/defender.pt \
        [--config configs/ppd_defender_cf.yaml] [--thresholds 0 0.05 0.1 0.2 0.4] \
        [--out experiments/results/defender_dev_select.md] [--write ppd/weights/files/ppd_defender.pt]

The dev images (``data.val`` of the config: CVC train sequences 18-19, the last 30 PH2 train images; never
the val splits) get FM prompts from a fixed random same-data-set reference, exactly as the fit's
validation; the defender refines them with each threshold (remove while the best Q-value is ``> min_q``,
:func:`ppd.rl.rollout.greedy_defence`), and the mean low-res Dice gain per dev data set and overall is
printed. ``--write`` stores the defender with the threshold of the best overall gain in its
``env_config["min_q"]`` (atomic write), so every user of the file (``PromptDefender``, ``ppd.predict``,
``ppd.evaluate``) applies it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ppd.counterfactual import datamodule_from_config
from ppd.export import _read_dict, load_defender
from ppd.io import atomic_torch_save, atomic_write_text
from ppd.rl.rollout import greedy_defence


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--defender", required=True)
    p.add_argument("--config", default="configs/ppd_defender_cf.yaml")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.4])
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the dev FM references (the fit's validation seed)"
    )
    p.add_argument("--out", default=None)
    p.add_argument("--write", default=None, help="write the defender with the chosen min_q here")
    a = p.parse_args()
    agent, env_cfg = load_defender(a.defender)
    dm = datamodule_from_config(a.config, ["data.init_args.generate_missing=false"])
    dm.setup_images()
    env = dm.val_env
    groups = dm._pools["val"][2]
    names = [Path(c.root).name for c in dm.val_cfgs]
    ids_all = torch.arange(len(env))
    starts = []
    for ids in ids_all.split(16):  # the same reference draws as CounterfactualDefenderTask._fm_step
        g = torch.Generator().manual_seed(a.seed * 7919 + int(ids[0]))
        starts.append(dm.feature_matching_starts(ids, g, "val"))
    start = torch.cat(starts)
    before = env.dice_of(ids_all, start)
    rows = []
    for t in a.thresholds:
        tr = greedy_defence(env, agent, ids_all, start, None, True, bool(env_cfg.get("sam_inputs")), t)
        gain = env.dice_of(ids_all, tr.status) - before
        per = {n: float(gain[groups == gi].mean()) for gi, n in enumerate(names)}
        rows.append((t, float(gain.mean()), per, float(tr.steps.float().mean())))
        print(
            f"min_q {t:g}: dev gain {float(gain.mean()):+.4f} {per} removed {float(tr.steps.float().mean()):.2f}"
        )
    best = max(rows, key=lambda r: r[1])
    lines = [
        "# Dev selection of the stop threshold min_q (issue 23)",
        "",
        f"Defender `{a.defender}`; dev = `data.val` of `{a.config}` ({len(env)} images: "
        + ", ".join(f"{n} {int((groups == gi).sum())}" for gi, n in enumerate(names))
        + f"); FM start Dice (low-res) {float(before.mean()):.4f}. Gains are low-res Dice, FM + PPD − FM.",
        "",
        "| min_q (Q units = 10 x ΔDice) | dev gain | " + " | ".join(names) + " | mean removed |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for t, g, per, rem in rows:
        lines.append(
            f"| {t:g} | {g:+.4f} | " + " | ".join(f"{per[n]:+.4f}" for n in names) + f" | {rem:.2f} |"
        )
    lines += ["", f"Chosen: min_q = {best[0]:g} (best overall dev gain)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        atomic_write_text(Path(a.out), text)
    if a.write:
        payload = _read_dict(Path(a.defender), "defender file")
        payload["env_config"] = {**payload["env_config"], "min_q": float(best[0])}
        atomic_torch_save(payload, Path(a.write))
        print(f"wrote {a.write} with min_q = {best[0]:g}")


if __name__ == "__main__":
    main()
