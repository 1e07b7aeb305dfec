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
from cxr.model_input import Preprocess


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


def test_stored_maps_times_their_scale_are_the_grad_cam_so_films_share_one_scale():
    """``screen_maps`` (what scoring stores): a map is its Grad-CAM over its largest value, 0
    kept at 0, so map x scale gives back the Grad-CAM, for the predicted class and for COVID."""
    import torch.nn.functional as F

    from cxr.explain import class_activation_maps, screen_maps
    from cxr.models.classifier import head_weights, logits_and_features

    torch.manual_seed(0)
    model = build_model("resnet18-tiny", num_classes=4).eval()
    x = torch.randn(3, 3, 64, 64)
    probs, features, maps, scale, covid_maps, covid_scale = screen_maps(model, x, 16, covid=0)
    logits, layer4 = logits_and_features(model, x)
    for classes, got, s in ((probs.argmax(1), maps, scale), (torch.zeros(3, dtype=torch.long), covid_maps, covid_scale)):
        cams = class_activation_maps(layer4, head_weights(model), classes)
        expected = F.interpolate(cams[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
        assert torch.allclose(got * s.view(-1, 1, 1), expected, atol=1e-5)
    assert features.shape == (3, layer4.shape[1]) and torch.allclose(probs, torch.softmax(logits, 1))
