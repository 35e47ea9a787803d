"""Writes the corpus of odd training files beside this script (`python tests/odd_files/make.py`).
The files are committed; tests/test_odd_files.py trains on each one, every run. Seeded: running
this again writes the same tables (and images of the same pixels)."""
import gzip
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

HERE = Path(__file__).resolve().parent
N = 80


def base(seed=0, n=N) -> pd.DataFrame:
    """Two informative numbers and a label that follows them."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"x": rng.normal(0, 1, n).round(4), "y": rng.normal(10, 3, n).round(3)})
    frame["label"] = np.where(frame.x + (frame.y - 10) / 3 > 0, "yes", "no")
    return frame


def tables() -> None:
    rng = np.random.default_rng(1)
    colour = rng.choice(["red", "green", "blue"], N)

    base().assign(empty=np.nan).to_csv(HERE / "empty_numeric_column.csv", index=False)
    base().assign(empty=np.nan, colour=colour).to_csv(HERE / "empty_mixed_column.csv", index=False)
    f = base()
    f = pd.DataFrame({"âge (années)": f.x, "名前": colour, "a b": f.y, "a_b": rng.normal(0, 1, N).round(3),
                      "label": f.label})
    f.to_csv(HERE / "unicode_names.csv", index=False)
    euro = base().assign(colour=colour)
    euro.to_csv(HERE / "semicolon_decimal_comma.csv", index=False, sep=";", decimal=",")
    euro_text = euro.assign(y=[f"{v}".replace(".", ",") for v in euro.y])
    euro_text.loc[[4, 11, 30], "y"] = ["?", "-", "?"]
    euro_text.to_csv(HERE / "semicolon_decimal_comma_text.csv", index=False, sep=";", decimal=",")
    base().to_csv(HERE / "tab_separated.csv", index=False, sep="\t")
    (HERE / "utf8_bom.csv").write_bytes(b"\xef\xbb\xbf" + base().assign(colour=colour).to_csv(index=False).encode())
    notes = np.array(["fine", "see\nnext line", 'said "no"', "a, b"])[rng.integers(0, 4, N)]
    base().assign(note=notes).to_csv(HERE / "quoted_newlines.csv", index=False)
    with open(HERE / "compressed.csv.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        out.write(base().to_csv(index=False).encode())
    d = base()
    d.insert(0, "id", np.arange(1000, 1000 + N))
    d["day"] = pd.date_range("2024-01-01", periods=N, freq="D").strftime("%Y-%m-%d")
    d["when"] = pd.date_range("2024-01-01 08:00", periods=N, freq="37min").strftime("%Y-%m-%dT%H:%M:%S")
    d["constant"] = "same"
    d.to_csv(HERE / "dates_ids_constants.csv", index=False)
    t = base().assign(
        colour=pd.Categorical(colour),
        seen=pd.date_range("2024-03-01", periods=N, freq="h", tz="UTC"),
        born=pd.date_range("1990-01-01", periods=N, freq="W").date,
        price=[__import__("decimal").Decimal(f"{v:.2f}") for v in rng.uniform(1, 100, N)],
        count=pd.array(np.where(rng.random(N) < 0.2, None, rng.integers(0, 9, N)), dtype="Int64"),
        member=pd.array(np.where(rng.random(N) < 0.2, None, rng.random(N) < 0.5), dtype="boolean"),
        city=pd.array(np.where(rng.random(N) < 0.2, None, rng.choice(["Oslo", "Lyon"], N)), dtype="string"))
    t.to_parquet(HERE / "parquet_types.parquet", index=False)
    base().assign(tags=[["a", "b"][: i % 3] for i in range(N)],
                  place=[{"lat": 1.0 * i, "lon": 2.0} for i in range(N)]).to_parquet(
        HERE / "parquet_nested.parquet", index=False)
    parts = HERE / "parquet_parts"
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir()
    whole = base(seed=2)
    for i, rows in enumerate(np.array_split(np.arange(len(whole)), 3)):
        whole.iloc[rows].to_parquet(parts / f"part-{i:05d}.snappy.parquet", index=False)
    (parts / "_SUCCESS").write_bytes(b"")
    text = base().astype({"y": object})
    text.loc[rng.choice(N, 4, replace=False), "y"] = ["n/a", "?", "-", "n/a"]
    text.to_csv(HERE / "numbers_with_text.csv", index=False)
    inf = base()
    inf.loc[[3, 17], "x"] = [np.inf, -np.inf]
    inf.loc[5, "y"] = 1e39
    inf.to_csv(HERE / "infinities_and_huge.csv", index=False)
    one = base()
    one.loc[7, "label"] = "rare"
    one.to_csv(HERE / "single_row_class.csv", index=False)
    base()[["x", "label"]].to_csv(HERE / "single_feature.csv", index=False)
    b = base().assign(member=np.where(rng.random(N) < 0.5, "True", "False"))
    b.loc[[2, 9], "member"] = ""
    b.to_csv(HERE / "booleans.csv", index=False)
    base().assign(label=np.nan).to_csv(HERE / "target_all_missing.csv", index=False)
    (HERE / "header_only.csv").write_text("x,y,label\n")


def images() -> None:
    """Two classes of colour patches of many sizes, a truncated PNG, a file that is no image, and
    stray files."""
    root = HERE / "images"
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(3)
    for name, rgb in {"red": (200, 40, 40), "blue": (40, 60, 200)}.items():
        (root / name).mkdir(parents=True)
        for i in range(70):
            h, w = rng.integers(6, 15, 2)
            pixels = np.clip(np.array(rgb) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8) + 90).save(buffer, "PNG")
    (root / "red" / "truncated.png").write_bytes(buffer.getvalue()[:60])
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "red" / ".thumbnails").mkdir()
    (root / "red" / ".thumbnails" / "0.png").write_bytes(b"not even an image")
    (root / "README.md").write_text("colour patches\n")


if __name__ == "__main__":
    tables()
    images()
