"""``hrnet serve`` spoken to by the standard clients, unmodified: Triton's ``tritonclient.http`` in its
default mode (binary tensor data extension) and Hugging Face's ``InferenceClient(base_url=...)``, which
posts to the root. Answers are checked against ``hrnet.predict`` on the same checkpoint, and the FP32
tensor against the test's own mmcls preprocessing and forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hrnet.inference.predict import predict
from test_predict import CROP, MODEL, SHORT, model_and_photos
from test_serve import start_server
from test_transforms import mmcls_reference

pytest.importorskip("uvicorn", reason="hrnet[serve] is not installed")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("clients")
    _, ckpt, photos, ref_logits = model_and_photos(d)
    expected = predict(MODEL, photos, checkpoint=ckpt, input_size=CROP, workers=0, topk=5)
    server = start_server(d / "server", ckpt, "--backend", "eager")
    yield {"server": server, "photos": photos, "expected": expected, "ref": ref_logits.softmax(1)}
    assert server.stop() == 0


def test_tritonclient_default_mode_classifies_an_image_and_a_tensor(served):
    httpclient = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]'")
    server, photos, expected = served["server"], served["photos"], served["expected"]
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_model_ready(MODEL)
    config = client.get_model_config(MODEL)
    assert config["name"] == MODEL and config["output"][0]["dims"] == [1000]
    # an encoded image as BYTES, binary data (the client's default), with the classification extension
    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([photos[0].read_bytes()], dtype=np.object_))
    out = httpclient.InferRequestedOutput("probabilities", class_count=3)
    result = client.infer(MODEL, [image], outputs=[out])
    rows = [s.decode().split(":", 2) for s in result.as_numpy("probabilities").reshape(-1)]
    want = expected[0]["topk"][:3]
    assert [int(r[1]) for r in rows] == [t["index"] for t in want]
    assert [r[2] for r in rows] == [t["label"] for t in want]
    np.testing.assert_allclose([float(r[0]) for r in rows], [t["score"] for t in want], atol=1e-5)
    # the preprocessed tensor as FP32, binary both ways (no outputs named: binary_data_output)
    x = np.stack([mmcls_reference(Image.open(p).convert("RGB"), SHORT, CROP) for p in photos[:2]]).astype(np.float32)
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    probs = client.infer(MODEL, [tensor]).as_numpy("probabilities")
    assert probs.shape == (2, 1000) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, served["ref"][:2].numpy(), rtol=0, atol=1e-5)


def test_huggingface_inference_client_posts_to_the_root(served):
    hub = pytest.importorskip("huggingface_hub", reason="pip install huggingface_hub")
    server, photos, expected = served["server"], served["photos"], served["expected"]
    client = hub.InferenceClient(base_url=f"http://127.0.0.1:{server.port}")
    for k in (None, 3):
        got = client.image_classification(photos[1].read_bytes(), top_k=k)
        want = expected[1]["topk"][: k or 5]
        assert [g.label for g in got] == [t["label"] for t in want]
        np.testing.assert_allclose([g.score for g in got], [t["score"] for t in want], atol=1e-5)


def test_top_k_beyond_the_class_count_is_clamped(served):
    """As Hugging Face's pipeline does: a client asking for more classes than the model has gets all of them."""
    server = served["server"]
    status, got = server.json("POST", "/v1/classify?top_k=5000", served["photos"][0].read_bytes())
    assert status == 200 and len(got) == 1000
    status, info = server.json("GET", "/v1/model")
    assert status == 200 and info["name"] == MODEL and info["num_classes"] == 1000
    assert info["labels"][:2] == ["tench, Tinca tinca", "goldfish, Carassius auratus"]


@pytest.mark.parametrize("binary, header, field", [
    (b"x" * 5, None, "inputs[0].parameters.binary_data_size"),  # 5 bytes where 10 were announced
    (b"\xff\x00\x00\x00" + b"x" * 6, None, "inputs[0]: binary BYTES element"),  # element longer than the data
    (b"x" * 10, "999999", "Inference-Header-Content-Length"),  # header longer than the body
], ids=["size-mismatch", "element-overrun", "header-too-long"])
def test_binary_extension_refusals_name_the_field(binary, header, field):
    """The binary tensor data extension's framing is checked before anything is decoded (no server needed)."""
    import json

    from hrnet.serve.protocol import RequestError, parse_infer

    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 10}}]}).encode()
    with pytest.raises(RequestError) as e:
        parse_infer(head + binary, CROP, 1000, 8, header or str(len(head)))
    assert e.value.status == 400 and str(e.value).startswith(field), str(e.value)
