"""The Python torch side of `rankpilot bench svd` (same work, same inputs, timed the same way).

Usage: bench_svd.py <inputs.safetensors> <k> <oversample> <power_iters> <repeats> <threads> [device]
Reads B [d, r], A [r, d] (the adapter) and the test matrices `decaying`, `flat`; prints JSON.
"""
import json
import sys
import time

import torch
from safetensors.torch import load_file


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(f, repeats):
    f()  # warm-up
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        sync()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def qr_core_squeeze(b, a, k):
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    uc, s, vch = torch.linalg.svd(rb @ ra.T)
    root = s[:k].sqrt()
    return (qb @ uc[:, :k]) * root, root[:, None] * (vch[:k] @ qa.T)


def main(path, k, p, q, repeats, threads, device="cpu"):
    torch.set_num_threads(threads)
    d = {n: t.to(device) for n, t in load_file(path).items()}
    b, a = d["B"], d["A"]
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    out["qr_core_s"] = median_time(lambda: qr_core_squeeze(b, a, 16), repeats)
    for name in ["decaying", "flat"]:
        m = d[name]
        torch.manual_seed(0)
        out[f"rsvd_{name}_s"] = median_time(lambda: torch.svd_lowrank(m, q=k + p, niter=q), max(1, repeats // 4))
        u, s, v = torch.svd_lowrank(m, q=k + p, niter=q)
        approx = (u[:, :k] * s[:k]) @ v[:, :k].T
        out[f"rsvd_{name}_err"] = (m - approx).norm().item()
    print(json.dumps(out))


if __name__ == "__main__":
    path, k, p, q, repeats, threads, *device = sys.argv[1:]
    main(path, int(k), int(p), int(q), int(repeats), int(threads), *device)
