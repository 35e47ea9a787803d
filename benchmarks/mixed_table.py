"""Write a synthetic customer table with mixed types and gaps, for trying the mixed-table path.

    python -m benchmarks.mixed_table --rows 60000 --out customers.csv
    python -m training.fit --data customers.csv --target churned
    python -m benchmarks.mixed_table --rows 30000 --high-cardinality --out wide.csv

Columns: a customer id (dropped by training as a row id), numbers with missing values, text
categories with missing values, and a churn label that depends on both. With --high-cardinality
also an e-mail address per customer (near-unique: left out by training) and a postcode of 3,000
(Zipf-distributed shares), whose 30 most common ones carry some of the signal.
"""
import argparse

import numpy as np
import pandas as pd


def customers(n: int, seed: int = 0, high_cardinality: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "customer_id": [f"C{100000 + i}" for i in range(n)],
        "age": rng.integers(18, 85, n).astype(float),
        "income": rng.lognormal(10.8, 0.5, n).round(-2),
        "tenure_months": rng.integers(0, 120, n),
        "support_calls": rng.poisson(1.5, n),
        "plan": rng.choice(["basic", "plus", "pro"], n, p=[0.5, 0.35, 0.15]),
        "region": rng.choice([f"region-{i}" for i in range(12)], n),
        "device": rng.choice(["ios", "android", "web", None], n, p=[0.4, 0.4, 0.15, 0.05]),
    })
    frame.loc[rng.random(n) < 0.08, "age"] = np.nan
    frame.loc[rng.random(n) < 0.12, "income"] = np.nan
    logit = (0.6 * frame.support_calls - 0.03 * frame.tenure_months
             - 0.8 * (frame.plan == "pro") + 0.5 * (frame.device == "web")
             - 0.4 * np.log(frame.income.fillna(50_000) / 50_000)
             + 0.3 * frame.region.isin(["region-3", "region-7"]) - 0.5)
    if high_cardinality:
        shares = 1 / np.arange(1, 3001)
        postcode = rng.choice(3000, n, p=shares / shares.sum())
        frame["email"] = [f"customer{i}.{rng.integers(1e6)}@example.org" for i in range(n)]
        frame["postcode"] = [f"PC-{p:04d}" for p in postcode]
        logit = logit + 0.8 * ((postcode < 30) & (postcode % 3 == 0))
    frame["churned"] = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "yes", "no")
    return frame


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--out", default="customers.csv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--high-cardinality", action="store_true",
                        help="add an e-mail column and a 3,000-category postcode column")
    args = parser.parse_args()
    customers(args.rows, args.seed, args.high_cardinality).to_csv(args.out, index=False)
    print(f"wrote {args.rows} rows to {args.out}")
