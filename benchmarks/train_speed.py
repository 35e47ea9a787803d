"""Training throughput: the project's loop vs. the usual DataLoader loop, side by side in one run.

    python -m benchmarks.train_speed
    python -m benchmarks.train_speed --rows 50000 --repeats 1     # quicker

Same model (MLP with BatchNorm), data and batch size for every loop: the usual DataLoader loop
(AdamW as usually constructed), the same loop given the project's fused AdamW (to isolate the
loop itself), and the project's loop. Reports samples/s, the ratios, and achieved FLOP/s as a
share of this machine's float32 matmul peak (measured here first). Writes
benchmarks/results/train_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from training import engine
from training.batches import shuffled_batches
from training.schedules import LRSchedule
from training.model import TabularNet

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {  # name: (features, hidden widths)
    "wide (50 features, MLP 256-256)": (50, [256, 256]),
    "narrow (20 features, MLP 64-64)": (20, [64, 64]),
}


def matmul_peak(device: torch.device, n: int = 2048, seconds: float = 2.0) -> float:
    """Best float32 FLOP/s of n x n matrix products on this device."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sync(device)
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_flops_per_sample(n_features: int, hidden: list[int], n_out: int) -> int:
    """Multiply-adds of the Linear layers x 2 (FLOPs) x 3 (forward, and backward for inputs and
    weights); BatchNorm, ReLU and the optimizer are not counted."""
    widths = [n_features, *hidden, n_out]
    return 6 * sum(a * b for a, b in zip(widths, widths[1:]))


def make_model(n_features, hidden, device, fused: bool):
    """The project's network; AdamW fused (as the project trains) or as usually constructed."""
    torch.manual_seed(0)
    net = TabularNet(n_features, 2, hidden).to(device)
    return net, torch.optim.AdamW(net.parameters(), lr=1e-3, fused=fused)


def dataloader_epoch(net, optimizer, X, y, batch_size, device):
    """The usual loop: a shuffling DataLoader over a TensorDataset, batches moved to the device."""
    net.train()
    for xb, yb in DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=True, drop_last=True):
        loss = F.cross_entropy(net(xb.to(device)), yb.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def project_epoch(net, optimizer, X, y, batch_size, generator):
    schedule = LRSchedule("none", optimizer, 1e-3, 1, 1, 0, True)
    engine.train_one_epoch(net, shuffled_batches(X, y, batch_size, generator), "classification",
                           optimizer, schedule)


def best_rates(loops: dict, rows: int, repeats: int, device) -> dict[str, float]:
    """Samples/s of each loop's best epoch; the loops take turns, so drift in the machine's speed
    hits them alike."""
    for fn in loops.values():
        fn()  # warm-up epoch: allocations, lazy initialization
    best = dict.fromkeys(loops, 0.0)
    for _ in range(repeats):
        for name, fn in loops.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            best[name] = max(best[name], rows / (time.perf_counter() - t))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per loop (best kept)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    peak = matmul_peak(device)
    print(f"{device} ({torch.get_num_threads()} threads): float32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s", flush=True)
    results = []
    for name, (n_features, hidden) in CASES.items():
        g = torch.Generator().manual_seed(0)
        X = torch.randn(args.rows, n_features, generator=g)
        y = (X[:, 0] + X[:, 1] > 0).long()
        flops = train_flops_per_sample(n_features, hidden, 2)
        row = {"case": name, "rows": args.rows, "batch_size": args.batch_size}
        models = {key: make_model(n_features, hidden, device, fused)
                  for key, fused in (("dataloader", False), ("dataloader_fused_adamw", True),
                                     ("project", True))}
        Xd, yd = X.to(device), y.to(device)
        gen = torch.Generator().manual_seed(0)
        loops = {key: (lambda m=models[key]: dataloader_epoch(*m, X, y, args.batch_size, device))
                 for key in ("dataloader", "dataloader_fused_adamw")}
        loops["project"] = lambda m=models["project"]: project_epoch(*m, Xd, yd, args.batch_size, gen)
        for key, rate in best_rates(loops, args.rows, args.repeats, device).items():
            row[f"{key}_samples_per_s"] = rate
        row["ratio"] = row["project_samples_per_s"] / row["dataloader_samples_per_s"]
        row["ratio_same_optimizer"] = (row["project_samples_per_s"]
                                       / row["dataloader_fused_adamw_samples_per_s"])
        row["project_gflops"] = row["project_samples_per_s"] * flops / 1e9
        row["share_of_peak"] = row["project_samples_per_s"] * flops / peak
        results.append(row)
        print(f"  {name}: done", flush=True)

    header = (f"{'case':<32} {'DataLoader/s':>12} {'+fused/s':>9} {'project/s':>10} {'ratio':>6} "
              f"{'same opt':>8} {'GFLOP/s':>8} {'% peak':>7}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        print(f"{r['case']:<32} {r['dataloader_samples_per_s']:>12,.0f} "
              f"{r['dataloader_fused_adamw_samples_per_s']:>9,.0f} {r['project_samples_per_s']:>10,.0f} "
              f"{r['ratio']:>5.2f}x {r['ratio_same_optimizer']:>7.2f}x {r['project_gflops']:>8.1f} "
              f"{100 * r['share_of_peak']:>6.1f}%")
    print("samples/s; ratio: project vs. the usual DataLoader loop; same opt: vs. the DataLoader "
          "loop given the project's fused AdamW")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "train_speed.json"
    out.write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(),
                               "cpu": platform.processor() or platform.machine(),
                               "cores": os.cpu_count(), "torch": torch.__version__,
                               "matmul_peak_gflops": peak / 1e9, "repeats": args.repeats,
                               "cases": results}, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
