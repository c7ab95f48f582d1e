"""The bundled toy-faces model and classifier: they load, sample, and score rendered faces correctly."""

import numpy as np
import torch

from hspace import Engine
from hspace.loading import DEFAULT_MODEL
from hspace.toyfaces.classifier import HELDOUT_SEED0, classify, evaluate
from hspace.toyfaces.render import BINARY, render_batch


def test_bundled_model_is_the_default_and_samples_the_right_shape():
    assert DEFAULT_MODEL == "toyfaces"
    engine = Engine.load(device="cpu")
    assert engine.name == "toyfaces" and engine.sample_shape == (3, 32, 32) and engine.h_shape == (128, 8, 8)
    a = engine.sample([5, 6], num_steps=4, eta=1.0)
    b = engine.sample([5, 6], num_steps=4, eta=1.0)
    assert a.images.shape == (2, 3, 32, 32)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images[0], a.images[1])


def test_classifier_scores_rendered_faces_correctly():
    """48 held-out renders of independent attributes: every binary right, continuous close."""
    images, labels, _ = render_batch(range(HELDOUT_SEED0 + 7000, HELDOUT_SEED0 + 7048), correlated=False)
    scores = classify(torch.from_numpy(images))
    for name in BINARY:
        predicted = (scores[name] > 0.5).numpy()
        assert (predicted == (labels[name] > 0.5)).mean() >= 0.95, name
    metrics = evaluate(scores, labels)
    for name in ("hair_color", "skin_tone", "yaw", "background"):
        assert metrics[f"{name}_r2"] >= 0.9, (name, metrics)
    # toggling one attribute of one face flips exactly that score
    from hspace.toyfaces.render import render_many, sample_attributes

    face = sample_attributes(np.random.default_rng(3), correlated=False)
    variants = [face.replace(glasses=False), face.replace(glasses=True), face.replace(hat=not face.hat)]
    toggled = classify(torch.from_numpy(render_many(variants)[0]))
    assert toggled["glasses"][0] < 0.5 < toggled["glasses"][1]
    assert (toggled["hat"][2] > 0.5) != face.hat


def test_classifier_rejects_bad_images():
    import pytest

    from hspace import HspaceError

    with pytest.raises(HspaceError, match=r"got \(2, 1, 32, 32\)"):
        classify(torch.zeros(2, 1, 32, 32))
