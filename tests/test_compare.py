"""The offline gate, `python -m training.compare`: a better, a worse and an equal candidate; rows
a candidate cannot take; an image folder."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_frame, quick_config
from training.compare import EXIT_ERROR, EXIT_KEEP, EXIT_PROMOTE, main
from training.fit import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A model trained on 600 rows (strong) and one on 40 (weak), of one recipe; one that needs a
    column the other leaves out; and labelled rows none of them trained on."""
    tmp = tmp_path_factory.mktemp("gate")
    train = make_frame(n=1000, seed=11)
    train.to_csv(tmp / "big.csv", index=False)
    train.head(40).to_csv(tmp / "small.csv", index=False)
    holdout = make_frame(n=800, seed=12)
    holdout.to_csv(tmp / "holdout.csv", index=False)
    gappy = holdout.copy()
    gappy.loc[:4, "score"] = np.nan  # five rows a model that takes `score` as a number cannot take
    gappy.to_csv(tmp / "gappy.csv", index=False)

    def fit(name, data, **extra):
        options = {"epochs": 20, "hidden": [32, 16], **extra}
        return run(quick_config(tmp / name, data=str(tmp / data), target="label", name="gate", **options)).tag
    return {"strong": fit("strong", "big.csv"), "weak": fit("weak", "small.csv", epochs=4),
            "no_score": fit("no_score", "big.csv", drop=["score"]), "dir": tmp}


def gate(capsys, models, champion, candidate, data="holdout.csv", *extra):
    out = models["dir"] / f"{champion}-{candidate}.json"
    code = main(["--champion", models[champion], "--candidate", models[candidate],
                 "--data", str(models["dir"] / data), "--target", "label", "--bootstrap", "300",
                 "--json", str(out), *extra])
    printed = capsys.readouterr()
    return code, (json.loads(out.read_text()) if out.exists() else None), printed


def test_a_worse_candidate_is_kept_out(capsys, models):
    code, report, printed = gate(capsys, models, "strong", "weak")
    assert code == EXIT_KEEP and report["verdict"] == "keep"
    low, high = report["primary"]["interval"]
    assert report["primary"]["metric"] == "accuracy" and high < 0 and low < -0.005
    assert report["metrics"]["champion"]["accuracy"] > report["metrics"]["candidate"]["accuracy"]
    assert "verdict    KEEP" in printed.out


def test_a_better_candidate_is_promoted(capsys, models):
    code, report, printed = gate(capsys, models, "weak", "strong")
    assert code == EXIT_PROMOTE and report["verdict"] == "promote" and report["primary"]["interval"][0] > 0
    assert "verdict    PROMOTE" in printed.out


def test_an_equal_candidate_is_promoted_no_worse(capsys, models):
    code, report, _ = gate(capsys, models, "strong", "strong")
    assert code == EXIT_PROMOTE and report["primary"]["interval"] == [0.0, 0.0]
    assert all(v == 0 for v in report["difference_in_candidates_favour"].values())


def test_a_secondary_metric_or_the_primary_chosen_can_keep_it_out(capsys, models):
    code, report, _ = gate(capsys, models, "weak", "strong", "holdout.csv", "--metric", "log_loss",
                           "--min-change", "5")
    assert code == EXIT_KEEP and any("--min-change 5" in r for r in report["reasons"])


def test_rows_a_candidate_cannot_take_are_counted_not_fatal(capsys, models):
    code, report, printed = gate(capsys, models, "no_score", "strong", "gappy.csv")
    assert code in (EXIT_PROMOTE, EXIT_KEEP)
    assert report["rows"] == 800 and report["rows_compared"] == 795
    assert report["rows_not_taken"]["champion"]["count"] == 0  # it leaves `score` out
    taken = report["rows_not_taken"]["candidate"]
    assert taken["count"] == 5 and "score" in next(iter(taken["examples"].values()))
    assert "5 row(s) the candidate cannot take" in printed.out


def test_errors_are_one_line_with_exit_2(capsys, models):
    assert main(["--champion", "gate:nope", "--candidate", models["strong"],
                 "--data", str(models["dir"] / "holdout.csv"), "--target", "label"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: gate:nope is not in the BentoML model store") and err.count("\n") == 1
    assert main(["--champion", models["weak"], "--candidate", models["strong"],
                 "--data", str(models["dir"] / "holdout.csv"), "--target", "nope"]) == EXIT_ERROR
    assert "target column 'nope' not found" in capsys.readouterr().err


def test_the_command_line_exits_0_3_or_2(models):
    base = [sys.executable, "-m", "training.compare", "--data", str(models["dir"] / "holdout.csv"),
            "--target", "label", "--bootstrap", "100"]
    run_gate = lambda a, b: subprocess.run(base + ["--champion", models[a], "--candidate", models[b]],  # noqa: E731
                                           cwd=ROOT, capture_output=True, text=True, timeout=120).returncode
    assert (run_gate("weak", "strong"), run_gate("strong", "weak")) == (0, 3)


def test_image_folders_are_compared_as_uploads(capsys, tmp_path):
    from test_images import make_folder
    folder = make_folder(tmp_path / "colours", n=16)
    a = run(quick_config(tmp_path / "a", images=str(folder), image_size=12, channels=[8], epochs=3, name="gate-images"))
    code = main(["--champion", a.tag, "--candidate", a.tag, "--data", str(folder), "--bootstrap", "50"])
    assert code == EXIT_PROMOTE
    assert f"{3 * 16} compared of {3 * 16}" in capsys.readouterr().out
