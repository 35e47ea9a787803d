"""The exported ONNX graph: raw features in, the trained model's outputs out, self-describing."""
import json

import bentoml
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import torch_reference
from training.contract import decode_metadata
from training.export import ExportError, export_onnx, sha256
from training.model import TabularNet, serving_model


def session(result):
    return ort.InferenceSession(str(result.model_dir / "model.onnx"), providers=["CPUExecutionProvider"])


def test_graph_takes_raw_features_and_matches_torch(classifier):
    X = classifier.data.split.X_test
    probabilities, label = session(classifier).run(None, {"features": X.astype(np.float32)})
    np.testing.assert_allclose(probabilities, torch_reference(classifier, X), atol=1e-5)
    assert np.array_equal(label, probabilities.argmax(1))
    assert classifier.card["parity"]["max_abs_diff"] <= 1e-4


def test_regression_graph_returns_original_units(regressor):
    X, y = regressor.data.split.X_test, regressor.data.split.y_test
    (prediction,) = session(regressor).run(None, {"features": X.astype(np.float32)})
    np.testing.assert_allclose(prediction, torch_reference(regressor, X), atol=1e-3, rtol=1e-6)
    assert abs(prediction.mean() - y.mean()) < 0.2 * y.std()  # the units of y, not standardized
    assert regressor.card["metrics"]["test"]["r2"] > 0.5


def test_one_row_alone_equals_the_row_in_a_batch(classifier):
    s, X = session(classifier), classifier.data.split.X_test.astype(np.float32)
    batch = s.run(["probabilities"], {"features": X})[0]
    for i in range(5):
        alone = s.run(["probabilities"], {"features": X[i:i + 1]})[0]
        np.testing.assert_allclose(alone[0], batch[i], atol=1e-6)


def test_graph_has_named_inputs_outputs_and_a_dynamic_batch(classifier):
    s = session(classifier)
    (inp,) = s.get_inputs()
    assert (inp.name, inp.type, inp.shape[1]) == ("features", "tensor(float)", 4)
    assert isinstance(inp.shape[0], str)
    assert [o.name for o in s.get_outputs()] == ["probabilities", "label"]


def test_metadata_round_trips(classifier):
    meta = decode_metadata(session(classifier).get_modelmeta().custom_metadata_map)
    card = classifier.card
    for key in ("schema_version", "model", "task", "feature_names", "classes", "normalization",
                "metrics", "versions", "created_at"):
        assert meta[key] == card[key], key
    assert meta["feature_names"] == ["income", "ratio", "age", "score"]
    assert meta["classes"] == ["approved", "declined"]
    np.testing.assert_allclose(meta["normalization"]["mean"], classifier.data.split.X_train.mean(0))
    assert meta["versions"]["torch"] == torch.__version__


def test_artifacts_are_complete_and_checksummed(classifier):
    d = classifier.model_dir
    assert sorted(p.name for p in d.iterdir()) == ["card.json", "config.yaml", "curves.png", "model.onnx"]
    card = json.loads((d / "card.json").read_text())
    assert card["onnx_sha256"] == sha256(d / "model.onnx")
    assert (d / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(d.parent.glob(".*.tmp"))
    onnx.checker.check_model(onnx.load(d / "model.onnx"))


def test_model_is_in_the_bentoml_store(classifier):
    model = bentoml.models.get(classifier.tag)
    assert str(model.tag) == classifier.card["model"]
    assert (sha256(model.path_of("model.onnx"))) == classifier.card["onnx_sha256"]
    assert model.info.labels["task"] == "classification"


class StubbornBatchNorm(torch.nn.BatchNorm1d):
    def train(self, mode=True):  # ignores eval(): would export batch statistics
        self.training = True
        return self


def test_export_refuses_a_model_still_in_training_mode():
    net = TabularNet(3, 2, [4])
    net.body[1] = StubbornBatchNorm(4)
    head = serving_model(net, "classification")
    with pytest.raises(ExportError, match="training mode: .*body.1"):
        export_onnx(head, torch.zeros(1, 3), "features", "classification")
