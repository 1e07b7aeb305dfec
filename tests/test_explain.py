"""Grad-CAM from the forward pass equals the grad-cam package's (backward-pass) Grad-CAM on
real X-rays, for the full-size ResNet50 and its tiny twin."""

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cxr.card import Preprocessing
from cxr.explain import heatmap_png, heatmap_to_uint8, predict_with_cam
from cxr.models import build_model
from cxr.preprocess import classifier_input
from cxr.screen import Preprocess


@pytest.mark.parametrize("name,size", [("resnet50", 224), ("resnet18-tiny", 64)])
def test_forward_cam_matches_grad_cam_package(sample_root, name, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=4).eval()
    uris = sorted(str(p) for p in (sample_root / "covid").rglob("*.jpg"))[:2] + \
        sorted(str(p) for p in (sample_root / "kermany").rglob("*.jpg"))[:2]
    images, _ = Preprocess(Preprocessing.for_classifier(size)).prepare(uris)
    x = classifier_input(torch.from_numpy(images))
    targets = torch.tensor([0, 1, 2, 3])
    probs, ours = predict_with_cam(model, x, size, classes=targets)
    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    assert probs.shape == (4, 4) and torch.allclose(probs.sum(1), torch.ones(4))
    assert ours.shape == theirs.shape == (4, size, size)
    assert float(ours.max()) > 0.99                       # a real map, not all zeros
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-3, rtol=1e-3)


def test_cam_of_predicted_class_by_default_and_png_roundtrip():
    torch.manual_seed(0)
    model = build_model("resnet18-tiny", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    probs, cams = predict_with_cam(model, x, 32)
    _, explicit = predict_with_cam(model, x, 32, classes=probs.argmax(1))
    assert torch.equal(cams, explicit)
    heat = heatmap_to_uint8(cams)
    assert heat.dtype == np.uint8 and heat.shape == (2, 32, 32)
    from io import BytesIO

    from PIL import Image
    assert np.array_equal(np.array(Image.open(BytesIO(heatmap_png(heat[0])))), heat[0])
