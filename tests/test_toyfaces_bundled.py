"""The bundled toy-faces model and classifier: they load, sample, and score rendered faces correctly."""

import json

import numpy as np
import pytest
import torch

from hspace import Engine
from hspace.errors import HspaceError
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


def test_the_bundled_toy_dit_samples_faces_with_h_where_the_block_study_put_it():
    """toydit: a float16 DiT trained with flow matching, at most 25 MB, whose default h is the block study's winner
    (docs/blocks/blocks.json), and whose samples the classifier reads as faces with confidence."""
    import json
    from pathlib import Path

    from hspace.loading import TOYDIT_FOLDER
    from hspace.reproduce.runner import confidence
    from safetensors.torch import load_file

    engine = Engine.load("toydit", device="cpu")
    study = json.loads((Path(__file__).parents[1] / "docs" / "blocks" / "blocks.json").read_text())
    assert engine.model.family == "DiT" and engine.spec.spacing == "flow:shift=1" and not engine.model.guided
    assert engine.h_location == study["ranking"]["winner"] == "block.5" and engine.h_shape == (192, 16, 16)
    weights = TOYDIT_FOLDER / "transformer" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 25e6 and {t.dtype for t in load_file(weights).values()} == {torch.float16}
    samples = engine.sample(range(16), 10, eta=0.0)
    scores = classify(samples.images)
    assert float(confidence(scores).mean()) >= 0.9
    # different faces: every binary attribute both present and absent among 16 samples
    assert all(0 < int((scores[name] > 0.5).sum()) < 16 for name in BINARY)


def test_a_copied_toyfaces_folder_keeps_its_domain_by_fingerprint(tmp_path):
    import shutil

    from hspace.bank import build_bank
    from hspace.directions.supervised import annotate_bank
    from hspace.domains import domain_of
    from hspace.loading import TOYFACES_FOLDER

    copy = shutil.copytree(TOYFACES_FOLDER, tmp_path / "my faces")
    engine = Engine.load(str(copy))
    assert engine.name != "toyfaces" and domain_of(engine.spec).name == "toyfaces"
    bank = build_bank(tmp_path / "bank", engine, 4, 3, 1.0, progress=False)
    scores = annotate_bank(bank)  # the scorer found by the copy's fingerprint, not by its path
    assert set(scores) >= {"smile", "hat"} and len(scores["smile"]) == 4
    record = json.loads((copy / "training.json").read_text())
    (copy / "training.json").write_text(json.dumps({**record, "note": "edited"}))  # a file the fingerprint reads
    with pytest.raises(HspaceError, match="no domain is registered"):
        domain_of(Engine.load(str(copy)).spec)  # other content: another model, no domain
