"""The image path: folders and digits-images, channel statistics, the uint8 graph, uploads over HTTP."""
import io

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from conftest import quick_config
from test_service import request, serving
from training.config import make_config
from training.data import DataError, load_table, split_table
from training.fit import run
from training.images import ImageError, read_image
from training.model import ConvNet
from training.normalize import ChannelStats

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_folder(root, n=24, size=16, seed=0):
    """Noisy colour patches, one sub-folder per class; a few saved as JPEG."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            ext = "jpg" if i % 6 == 0 else "png"
            Image.fromarray(pixels).save(root / name / f"{i}.{ext}")
    return root


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("imgs") / "colours")


@pytest.fixture(scope="module")
def image_model(folder, tmp_path_factory):
    """Trained on 16x16 files resized to 12x12: uploads of any size are resized the same way."""
    tmp = tmp_path_factory.mktemp("imgmodel")
    return run(quick_config(tmp, images=str(folder), image_size=12, channels=[8, 16], epochs=6))


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("digits")
    return run(quick_config(tmp, dataset="digits-images", channels=[16, 32], epochs=6, batch_size=64))


def probabilities(result, images: np.ndarray) -> np.ndarray:
    """The PyTorch model in eval mode, torchvision normalization included, on uint8 images."""
    with torch.no_grad():
        return torch.softmax(result.trained.net.eval()(torch.from_numpy(images)), -1).numpy()


def test_channel_statistics_come_from_training_images_only(folder):
    table = load_table(make_config({"images": str(folder)}))
    split = split_table(table, 0.15, 0.15, 0)
    fitted = ChannelStats().fit(split.X_train)
    mean, std = fitted.mean_, fitted.std_
    x = split.X_train.astype(np.float64) / 255
    np.testing.assert_allclose(mean, [x[:, c].mean() for c in range(3)])
    np.testing.assert_allclose(std, [x[:, c].std() for c in range(3)])  # population (ddof=0)
    everything = table.X.astype(np.float64) / 255
    assert not np.allclose(mean, everything.mean(axis=(0, 2, 3)))


def test_card_and_onnx_metadata_carry_the_statistics(image_model):
    card = image_model.card
    assert card["modality"] == "image" and card["input"] == "images"
    assert card["image"] == {"channels": 3, "height": 12, "width": 12, "resize": True, "fit": "crop"}
    fitted = ChannelStats().fit(image_model.data.split.X_train)
    mean, std = fitted.mean_, fitted.std_
    np.testing.assert_allclose(card["normalization"]["mean"], mean)
    np.testing.assert_allclose(card["normalization"]["std"], std)
    assert card["classes"] == ["blue", "green", "red"]


def test_uint8_graph_matches_the_pytorch_model(image_model):
    session = ort.InferenceSession(str(image_model.model_dir / "model.onnx"))
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [3, 12, 12])
    X = image_model.data.split.X_test
    p, label = session.run(None, {"images": X})
    np.testing.assert_allclose(p, probabilities(image_model, X), atol=1e-5)
    assert image_model.card["metrics"]["test"]["accuracy"] >= 0.9


def test_digits_images_learns(digits_model):
    assert digits_model.card["image"]["height"] == 8
    assert digits_model.card["metrics"]["test"]["accuracy"] > 0.85
    assert digits_model.card["parity"]["max_abs_diff"] < 1e-5


def test_augmentation_touches_training_batches_only():
    torch.manual_seed(0)
    net = ConvNet(1, 3, [4], augment=True)
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    assert not torch.allclose(net(x), net(x))


def test_read_image_converts_and_resizes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png", 3, None).shape == (3, 10, 14)
    assert np.array_equal(read_image(tmp_path / "a.png", 3, None), rgb.transpose(2, 0, 1))
    assert read_image(tmp_path / "a.png", 1, (6, 6)).shape == (1, 6, 6)
    with pytest.raises(ImageError, match="not a readable PNG or JPEG"):
        read_image(b"GIF89a nonsense", 3, None)


def test_folder_problems_are_named(tmp_path):
    make_folder(tmp_path / "ok", n=4)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "ok" / "red" / "big.png")
    assert load_table(make_config({"images": str(tmp_path / "ok"), "image_size": 8})).X.shape[1:] == (3, 8, 8)
    (tmp_path / "one" / "cats").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "one" / "cats" / "c.png")
    with pytest.raises(DataError, match="at least two classes; found 1"):
        load_table(make_config({"images": str(tmp_path / "one")}))
    with pytest.raises(DataError, match="image folder not found"):
        load_table(make_config({"images": str(tmp_path / "missing")}))


# --- over HTTP, against a real `bentoml serve` -------------------------------------------------

@pytest.fixture(scope="module")
def image_server(image_model):
    yield from serving(image_model)


@pytest.fixture(scope="module")
def digits_server(digits_model):
    yield from serving(digits_model)


def upload(url, data: bytes, field="image", filename="x.png"):
    boundary = "normserve-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return request(url + "/predict_image", body, content_type=f"multipart/form-data; boundary={boundary}")


def test_uploaded_file_gets_the_pytorch_models_answer(image_server, image_model, folder):
    for path in [folder / "red" / "1.png", folder / "green" / "0.jpg", folder / "blue" / "5.png"]:
        status, body = upload(image_server, path.read_bytes(), filename=path.name)
        assert status == 200, body
        expected = probabilities(image_model, read_image(path, 3, (12, 12))[None])[0]
        assert np.abs(np.array(body["probabilities"][0]) - expected).max() <= 1e-5
        assert body["predictions"] == [body["classes"][int(expected.argmax())]] == [path.parent.name]


def test_arrays_and_uploads_agree(image_server, folder):
    path = folder / "red" / "2.png"
    pixels = read_image(path, 3, (12, 12))
    assert request(image_server + "/predict", {"instances": [pixels.tolist()]}) == \
        upload(image_server, path.read_bytes())


@pytest.mark.parametrize("kind, message", [
    ("text", "not a readable PNG or JPEG image"),
    ("field", "expected one file in the multipart field 'image', got field(s): file"),
    ("json", "upload the image as multipart/form-data"),
])
def test_bad_uploads_get_4xx(image_server, folder, kind, message):
    png = (folder / "red" / "1.png").read_bytes()
    if kind == "json":
        status, body = request(image_server + "/predict_image", {"image": "red.png"})
    else:
        status, body = upload(image_server, b"hello, not an image" if kind == "text" else png,
                              field="file" if kind == "field" else "image")
    assert 400 <= status < 500 and message in body["error"]
    assert upload(image_server, png)[0] == 200


@pytest.mark.parametrize("instances, message", [
    ([np.zeros((1, 12, 12), int).tolist()], "expected 3 channel(s), got 1"),
    ([np.zeros((3, 12, 11), int).tolist()], "expected 12 pixels per row, got 11"),
    ([np.full((3, 12, 12), 300).tolist()], "integers 0..255, got 300"),
])
def test_bad_image_arrays_get_4xx(image_server, instances, message):
    status, body = request(image_server + "/predict", {"instances": instances})
    assert status == 400 and message in body["error"]


def test_model_without_resize_rejects_other_sizes(digits_server):
    status, body = upload(digits_server, png_bytes(np.zeros((16, 16), np.uint8)))
    assert status == 400 and "the image is 16x16 pixels; this model takes 8x8" in body["error"]
    status, body = upload(digits_server, png_bytes(np.zeros((8, 8), np.uint8)))
    assert status == 200 and body["classes"] == list(range(10))
