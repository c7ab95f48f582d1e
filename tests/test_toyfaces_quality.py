"""The quality statistics of `hspace toyfaces evaluate`, on labels with known answers."""

import math

import numpy as np
import torch

from hspace.toyfaces.quality import attribute_statistics, by_thirds, correlations, training_labels
from hspace.toyfaces.render import BINARY, render_batch


def labels_of(n, **columns):
    base = {name: np.zeros(n) for name in BINARY} | {"hair_color": np.zeros(n), "skin_tone": np.zeros(n), "yaw": np.zeros(n), "background": np.zeros(n)}
    return base | {k: np.asarray(v, dtype=float) for k, v in columns.items()}


def test_frequency_and_confidence():
    p = torch.tensor([0.95, 0.6, 0.05, 0.2])
    scores = {name: p for name in BINARY}
    stats = attribute_statistics(scores, confidence=0.9)
    assert stats["smile"]["frequency"] == 0.5  # 0.95 and 0.6
    assert stats["smile"]["confident"] == 0.5  # 0.95 and 0.05
    assert stats["all_binary"]["confident"] == 0.5


def test_smile_by_thirds_of_skin_tone():
    # smiles only on light skin (first third), none in the middle third, half in the dark third
    skin = [0.1, 0.2, 0.5, 0.6, 0.9, 0.95]
    smile = [1, 1, 0, 0, 1, 0]
    table = by_thirds(labels_of(6, skin_tone=skin, smile=smile, yaw=[-1, -0.9, 0, 0, 1, 1]))
    assert table["smile"]["skin_tone"] == [1.0, 0.0, 0.5]
    assert table["smile"]["yaw"] == [1.0, 0.0, 0.5]  # yaw's range is [-1, 1]; 1 itself is in the top third
    assert all(math.isnan(v) for v in by_thirds(labels_of(2, skin_tone=[0.1, 0.2]))["hat"]["skin_tone"][1:])


def test_correlations_and_training_labels_match_the_renderer():
    truth = training_labels(64)
    _, rendered, _ = render_batch(range(64))
    for name, values in rendered.items():
        np.testing.assert_allclose(truth[name], values, atol=1e-6, err_msg=name)
    c = correlations(labels_of(4, smile=[1, 1, 0, 0], hat=[1, 0, 0, 0], hair_color=[0.1, 0.9, 0.1, 0.9], glasses=[1, 1, 1, 0]))
    assert c["P(hat | smile)"] == 0.5 and c["P(hat | no smile)"] == 0.0
    assert c["P(glasses | dark hair)"] == 1.0 and c["P(glasses | light hair)"] == 0.5


def test_renoise_from_the_last_step_keeps_every_face(tmp_path):
    import json

    import pytest

    from hspace import Engine, HspaceError
    from hspace.cli import main
    from hspace.toyfaces.quality import renoise_flips

    engine = Engine.load("toyfaces")
    # t = 0: one step from faces with almost no noise; the bundled model must hand them back intact.
    report = renoise_flips(engine, "glasses", start_steps=[49], n=20, num_steps=50)
    (row,) = report["starts"]
    assert row["timestep"] == 0
    assert (row["frequency"], row["lost"], row["gained"]) == (0.5, 0.0, 0.0)
    # From pure noise nothing of the face survives: the outcome cannot follow the input.
    report = renoise_flips(engine, "glasses", start_steps=[0], n=20, num_steps=4)
    assert report["starts"][0]["lost"] + report["starts"][0]["gained"] > 0
    for kwargs, match in (({"attribute": "beard"}, "unknown attribute 'beard'"), ({"n": 7}, "even number"), ({"start_steps": [50]}, r"0\.\.49")):
        with pytest.raises(HspaceError, match=match):
            renoise_flips(engine, **kwargs)
    out = tmp_path / "renoise.json"
    main(["toyfaces", "renoise", "--attribute", "hat", "--start", "49", "--n", "4", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["attribute"] == "hat" and saved["starts"][0]["lost"] == 0.0
