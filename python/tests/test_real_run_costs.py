"""scripts/real_run_costs.py recovers known costs from synthetic `compare.json` runs."""

import json
import math
import pathlib
import re
import subprocess
import sys

import numpy as np

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "real_run_costs.py"


def synthetic_table(rng, seed0, costs):
    """A compare.json with two schedulers over 8 seeds whose final losses follow `costs` exactly
    (plus small noise): rounds trained, mean parameters and rank decreases vary per run."""
    sites, rounds, base = 4, 20, 1000
    seed_effect = {seed0 + k: rng.normal(2.0, 0.1) for k in range(8)}
    runs = []
    for scheduler in ["fixed", "policy:x"]:
        per_seed = []
        for k in range(8):
            seed = seed0 + k
            lost = set(rng.choice(rounds, size=rng.integers(0, 8), replace=False).tolist())
            ranks = [int(r) for r in rng.integers(2, 9, size=sites)]
            records, downs = [], 0
            for i in range(rounds):
                if scheduler != "fixed" and i not in lost and rng.random() < 0.3:
                    j = int(rng.integers(sites))
                    new = max(1, ranks[j] - 1) if rng.random() < 0.5 else ranks[j] + 1
                    ranks = ranks[:j] + [new] + ranks[j + 1:]
                records.append({"lost": i in lost, "skipped": False, "ranks": list(ranks),
                                "params": base * sum(ranks)})
            trained = [r for r in records if not r["lost"]]
            downs = sum(b < a for x, y in zip(trained, trained[1:]) for a, b in zip(x["ranks"], y["ranks"]))
            params = sum(r["params"] for r in trained) / len(trained)
            loss = (seed_effect[seed] + costs["rounds"] * math.log(rounds / len(trained))
                    + costs["params"] * math.log(base * 64 / params) + costs["decrease"] * downs / sites
                    + rng.normal(0, 1e-4))
            per_seed.append({"scheduler": scheduler, "rounds": records, "val_loss_final": loss})
        runs.append(per_seed)
    return {"seed": seed0, "runs": runs}


def test_recovers_the_costs_it_was_given(tmp_path):
    rng = np.random.default_rng(0)
    costs = {"rounds": 0.2, "params": 0.15, "decrease": 0.05}
    files = []
    for seed0 in (0, 100):
        f = tmp_path / f"t{seed0}.json"
        f.write_text(json.dumps(synthetic_table(rng, seed0, costs)))
        files.append(str(f))
    out = subprocess.run([sys.executable, str(SCRIPT), *files], capture_output=True, text=True, check=True).stdout
    assert "32 runs, 16 seed effects" in out, out

    def coefficient(name):
        m = re.search(re.escape(name) + r"\s+([+-][0-9.]+) ± ([0-9.]+)", out)
        assert m, out
        return float(m.group(1)), float(m.group(2))

    for name, want in [("ln(rounds / rounds trained)", 0.2), ("ln(reference / mean params)", 0.15),
                       ("decreases per site", 0.05), ("increases per site", 0.0)]:
        got, se = coefficient(name)
        assert abs(got - want) < 0.01, (name, got, se, out)


def test_too_few_runs_for_the_fit_exit_with_a_message(tmp_path):
    rng = np.random.default_rng(1)
    table = synthetic_table(rng, 0, {"rounds": 0.2, "params": 0.1, "decrease": 0.0})
    table["runs"] = [table["runs"][0][:1]]
    f = tmp_path / "one.json"
    f.write_text(json.dumps(table))
    p = subprocess.run([sys.executable, str(SCRIPT), str(f)], capture_output=True, text=True)
    assert p.returncode != 0 and "cannot fit" in p.stderr, (p.returncode, p.stderr)
