"""What a real run's final loss pays for: rounds trained, adapter size, rank changes.

Reads `compare.json` files written by `rankpilot compare` on one model and one preset, and fits,
by least squares over every run with a fixed effect per seed (the seed fixes the data order and
the channel draw),

    final val loss = seed effect + a·ln(rounds / rounds trained) + b·ln(reference params / mean params)
                     + c·(rank increases per site) + d·(rank decreases per site),

where "rounds trained" excludes lost and skipped rounds, "mean params" is over the trained rounds,
and a rank change is counted between consecutive trained rounds. Schedulers whose rank changes
follow their own fixed schedule (`--exclude`, default adalora and squeeze: their shrinks and their
sizes move together) are left out of the fit but listed. Prints each coefficient with its standard
error and, per file and scheduler, the mean of each regressor.

    ~/.cache/rankpilot/venv/bin/python scripts/real_run_costs.py runs/*/channel*/compare.json

Uses numpy from the set-up's venv; nothing is written.
"""

import argparse
import collections
import json
import math

import numpy as np


def run_features(run, reference_params):
    """(rounds, rounds trained, ln(reference/mean params), increases/site, decreases/site).

    The reference only shifts the regressor by a constant, which the seed effects absorb."""
    rounds = run["rounds"]
    trained = [r for r in rounds if not r["lost"] and not r["skipped"]]
    if not trained:
        return None
    sites = len(trained[0]["ranks"])
    ups = downs = 0
    for before, after in zip(trained, trained[1:]):
        for a, b in zip(before["ranks"], after["ranks"]):
            ups += b > a
            downs += b < a
    params = sum(r["params"] for r in trained) / len(trained)
    return len(rounds), len(trained), math.log(reference_params / params), ups / sites, downs / sites


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="compare.json files (one model, one preset)")
    ap.add_argument("--exclude", default="adalora,squeeze", help="schedulers left out of the fit")
    args = ap.parse_args()
    exclude = set(args.exclude.split(",")) if args.exclude else set()
    tables = [(path, json.load(open(path))) for path in args.files]
    # The largest adapter any round held: the "reference params" of the table's regressor.
    reference = max(
        r["params"] for _, d in tables for scheduler_runs in d["runs"] for run in scheduler_runs for r in run["rounds"]
    )
    runs = []
    for path, d in tables:
        for scheduler_runs in d["runs"]:
            for k, run in enumerate(scheduler_runs):
                f = run_features(run, reference)
                if f is not None:
                    runs.append((path, run["scheduler"], d["seed"] + k, f, run["val_loss_final"]))
    print(f"reference params: {reference}")
    fitted = [r for r in runs if r[1].split("@")[0] not in exclude]
    seeds = sorted({r[2] for r in fitted})
    column = {s: i for i, s in enumerate(seeds)}
    names = ["ln(rounds / rounds trained)", "ln(reference / mean params)", "increases per site", "decreases per site"]
    x = np.zeros((len(fitted), len(seeds) + len(names)))
    y = np.array([r[4] for r in fitted])
    for i, (_, _, seed, (n, trained, log_params, ups, downs), _) in enumerate(fitted):
        x[i, column[seed]] = 1.0
        x[i, len(seeds):] = [math.log(n / trained), log_params, ups, downs]
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ beta
    dof = len(y) - x.shape[1]
    if dof <= 0:
        raise SystemExit(f"{len(y)} runs cannot fit {x.shape[1]} coefficients: give more runs")
    s2 = resid @ resid / dof
    se = np.sqrt(np.diag(s2 * np.linalg.pinv(x.T @ x)))
    print(f"{len(y)} runs, {len(seeds)} seed effects, residual sd {math.sqrt(s2):.4f}")
    for j, name in enumerate(names):
        b, s = beta[len(seeds) + j], se[len(seeds) + j]
        print(f"  {name:30s} {b:+.4f} ± {s:.4f} ({b / s:+.1f} SE)")
    groups = collections.defaultdict(list)
    for path, scheduler, _, (n, trained, log_params, ups, downs), _ in runs:
        groups[(path, scheduler)].append((trained, log_params, ups, downs))
    for (path, scheduler), fs in groups.items():
        m = np.mean(fs, axis=0)
        tag = " (not fitted)" if scheduler.split("@")[0] in exclude else ""
        print(f"  {path} {scheduler}{tag}: rounds trained {m[0]:.1f}, ln(ref/params) {m[1]:.3f}, "
              f"increases/site {m[2]:.2f}, decreases/site {m[3]:.2f}")


if __name__ == "__main__":
    main()
