"""Export the eval-mode model, normalization included, to one ONNX graph; prove it; write the artifacts.

The graph applies the fitted normalizer first (its statistics are constants), then runs the
network; its inputs, outputs and metadata follow training/contract.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import torch
from torch import nn

from training.contract import INPUTS, OUTPUTS, PIPELINE_LABEL, encode_metadata
from training.dataset import SPLITS

PARITY_TOLERANCE = 1e-4
# Parity is checked on the split's first rows: enough to cover every path of the graph, and a
# streamed run's 100,000-row sample, one-hot encoded twice (PyTorch, onnxruntime), would cost more
# memory than the whole streamed training.
PARITY_ROWS = 10_000


class ExportError(RuntimeError):
    """Export or its parity check failed; nothing was written."""


OPSET = 18


def export_onnx(model: nn.Module, example: torch.Tensor, input_name: str, task: str) -> onnx.ModelProto:
    """The eval-mode model as an ONNX graph with a dynamic batch axis; `example` is one input row
    (or image) of the right dtype and shape.

    torch's TorchScript-based exporter first: 0.01 to 0.08 s for these networks, against 0.75 to
    3.1 s for the dynamo exporter (docs/quality.md, "Time to a model"); the dynamo exporter if it
    fails. Either way the parity check after export is the proof."""
    model = model.cpu().eval()
    if still_training := [name for name, m in model.named_modules() if m.training]:
        raise ExportError(f"modules still in training mode: {still_training}")
    example = example.expand(2, *example.shape[1:]).contiguous()  # batch >= 2 keeps the axis symbolic
    outputs = OUTPUTS[task]
    # The exporters narrate on stdout and warn about their own deprecations; keep the terminal ours.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            buffer = io.BytesIO()
            torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=[input_name],
                              output_names=outputs, opset_version=OPSET,
                              dynamic_axes={name: {0: "batch"} for name in [input_name, *outputs]})
            return onnx.load_from_string(buffer.getvalue())
        except Exception:
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=[input_name], output_names=outputs,
                dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET, verbose=False)
            return program.model_proto


def export_model(head: nn.Module, data, split: str, metadata: dict) -> tuple[onnx.ModelProto, dict]:
    """The exported graph (the normalizer's piece, then the network and its head) with its
    metadata, and proof that it answers a split's raw inputs (the test split's first PARITY_ROWS,
    or without one the validation split's) as `head` answers the same rows as the network takes
    them."""
    task, raw = data.table.task, getattr(data.split, f"X_{SPLITS[split]}")[:PARITY_ROWS]
    X = torch.as_tensor(np.asarray(data.normalizer.encode(raw)))
    X = X if data.table.modality == "image" else X.float()
    net_input = metadata["input"] or INPUTS["table"]  # mixed tables: the network's input inside
    proto = data.normalizer.graph(export_onnx(head, X[:1], net_input, task), net_input)
    onnx.helper.set_model_props(proto, encode_metadata(metadata))

    def feeds(rows: slice) -> dict[str, np.ndarray]:
        return data.normalizer.feeds(raw.iloc[rows] if isinstance(raw, pd.DataFrame) else raw[rows],
                                     net_input)

    return proto, {"split": split, **check_parity(proto, head, X.numpy(), feeds, task)}


def check_parity(proto: onnx.ModelProto, model: nn.Module, X: np.ndarray, feeds, task: str) -> dict:
    """onnxruntime on raw inputs vs. the PyTorch model in eval mode on the same rows, one by one
    and as one batch. `X` is what the PyTorch model takes; `feeds(rows)` gives the graph's raw
    inputs for a slice of those rows."""
    import onnxruntime as ort
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model.cpu().eval()(torch.from_numpy(np.ascontiguousarray(X)))
    expected = (expected[0] if task == "classification" else expected).numpy()
    output = OUTPUTS[task][0]
    batched = session.run([output], feeds(slice(None)))[0]
    singles = np.concatenate([session.run([output], feeds(slice(i, i + 1)))[0]
                              for i in range(min(len(X), 32))])
    diff_batch = float(np.abs(batched - expected).max())
    diff_single = float(np.abs(singles - expected[:len(singles)]).max())
    result = {"rows": len(X), "max_abs_diff_batch": diff_batch, "max_abs_diff_single": diff_single,
              "tolerance": PARITY_TOLERANCE}
    if task == "regression":  # float32 rounding grows with the target's magnitude
        result["max_abs_diff_standardized"] = max(diff_batch, diff_single) / float(model.y_scale)
        worst = result["max_abs_diff_standardized"]
    else:
        worst = max(diff_batch, diff_single)
    result["max_abs_diff"] = worst
    if not worst <= PARITY_TOLERANCE:
        raise ExportError(f"ONNX parity failed: max |onnx - torch| = {worst:.3g} > {PARITY_TOLERANCE}")
    return result


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def plot_curves(history: list[dict], metric: str, path: Path) -> None:
    """Loss, validation metric and learning rate per epoch, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [h["train_loss"] for h in history], label="train")
    axes[0].plot(epochs, [h["val_loss"] for h in history], label="validation")
    axes[0].set(title="loss", xlabel="epoch")
    axes[0].legend()
    axes[1].plot(epochs, [h[f"val_{metric}"] for h in history], color="tab:green")
    axes[1].set(title=f"validation {metric}", xlabel="epoch")
    axes[2].plot(epochs, [h["lr"] for h in history], color="tab:orange")
    axes[2].set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_artifacts(out_dir: Path, proto: onnx.ModelProto, card: dict, config_yaml: str,
                    plots: dict) -> dict:
    """Write model.onnx, card.json, config.yaml and the plots (file name -> a function drawing
    into a path) into a temporary folder beside out_dir, then rename it: a crash leaves no
    half-written model. Returns the card as written (with the sha256 of model.onnx)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        onnx.save(proto, tmp / "model.onnx")
        card = {**card, "onnx_sha256": sha256(tmp / "model.onnx")}
        (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        (tmp / "config.yaml").write_text(config_yaml)
        for name, draw in plots.items():
            draw(tmp / name)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


def save_to_bentoml(out_dir: Path, name: str, version: str, task: str) -> str:
    """Copy the artifacts into the BentoML model store as name:version (under $BENTOML_HOME)."""
    import bentoml
    with bentoml.models.create(f"{name}:{version}", labels={"pipeline": PIPELINE_LABEL, "task": task},
                               metadata={"task": task, "source_dir": str(out_dir)}) as ref:
        for f in out_dir.iterdir():
            shutil.copy2(f, Path(ref.path) / f.name)
    return str(ref.tag)
