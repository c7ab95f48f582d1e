"""eq. 10 and eq. 11 on hand-made tensors; annotation picks exactly the top and bottom k."""

import json

import pytest
import torch

from conftest import composition_tolerance
from hspace.spec import FREE
from hspace.bank import build_bank
from hspace.directions import Direction
from hspace.directions.disentangle import disentangle
from hspace.directions.supervised import annotate_bank, direction_from_scores, h_difference, mean_difference, top_bottom
from hspace.errors import HspaceError


def test_eq10_is_the_difference_of_means():
    pos = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # [2 examples, 1 step, 2]
    neg = torch.tensor([[[0.5, -1.0]], [[0.5, 1.0]], [[2.0, 3.0]]])
    assert torch.equal(h_difference(pos, neg), torch.tensor([[2.0 - 1.0, 3.0 - 1.0]], dtype=torch.float64))
    with pytest.raises(HspaceError, match="differ in steps or shape"):
        h_difference(pos, neg[:, :, :1])


def test_mean_difference_of_trajectories(engine, trajectory):
    d = mean_difference(trajectory[[0, 1]], trajectory[[2]], name="x")
    expected = trajectory.h[:2].double().mean(0) - trajectory.h[2].double()
    assert torch.allclose(d.delta.double(), expected, atol=1e-6) and d.name == "x"


def _dir(delta, name):
    return Direction(torch.as_tensor(delta, dtype=torch.float32), meta={"name": name}, spec=FREE)


def test_eq11_removes_the_span_of_the_others():
    g = torch.Generator().manual_seed(0)
    v = _dir(torch.randn(4, 3, 2, 2, generator=g), "v")
    others = [_dir(torch.randn(4, 3, 2, 2, generator=g), f"u{i}") for i in range(3)]
    out = disentangle(v, others)
    flat = out.delta.double().flatten()
    U = torch.stack([o.delta.double().flatten() for o in others])
    # Orthogonal to every other direction, over the whole h_{T:1}.
    assert (U @ flat).abs().max() / (U.norm(dim=1) * flat.norm()).min() < 1e-6
    # And what was removed lies in their span: v - v' = U^T c for the least-squares c.
    removed = v.delta.double().flatten() - flat
    c = torch.linalg.lstsq(U.T, removed[:, None]).solution
    assert torch.allclose(U.T @ c, removed[:, None], atol=1e-6)
    assert out.name == "v-disentangled" and out.meta["params"]["removed"] == ["u0", "u1", "u2"]
    # Per timestep: orthogonal at every step separately.
    per = disentangle(v, others, per_timestep=True)
    for t in range(4):
        for o in others:
            cos = torch.dot(per.delta[t].double().flatten(), o.delta[t].double().flatten())
            assert abs(float(cos)) / (per.delta[t].norm() * o.delta[t].norm()) < 1e-6
    # A direction orthogonal already is unchanged; one inside the span vanishes.
    e1 = _dir([[1.0, 0.0, 0.0]], "e1")
    assert torch.equal(disentangle(_dir([[0.0, 2.0, 3.0]], "w"), [e1]).delta, torch.tensor([[0.0, 2.0, 3.0]]))
    assert disentangle(_dir([[5.0, 0.0, 0.0]], "w"), [e1]).delta.abs().max() < 1e-6
    with pytest.raises(HspaceError, match="linearly dependent"):
        disentangle(v, [others[0], others[0] * 2.0])


def test_top_bottom_picks_exactly_k():
    scores = torch.tensor([0.5, 0.9, 0.1, 0.9, 0.3, 0.0, 0.7])
    top, bottom = top_bottom(scores, 2)
    assert top == [1, 3] and bottom == [5, 2]
    with pytest.raises(HspaceError, match="k must be an integer from 1 to n/2 = 3"):
        top_bottom(scores, 4)


def test_annotation_is_stored_and_drives_the_direction(tmp_path, engine):
    bank = build_bank(tmp_path / "b", engine, 8, 3, shard_size=3)
    calls = []

    def brightness(images):
        calls.append(len(images))
        return {"bright": images.mean(dim=(1, 2, 3)), "red": images[:, 0].mean(dim=(1, 2))}

    scores = annotate_bank(bank, brightness, name="mine", batch_size=5)
    assert calls == [5, 3]
    assert torch.equal(bank.scores("mine")["bright"], scores["bright"])
    d = direction_from_scores(bank, "bright", 3, scores="mine")
    top, bottom = top_bottom(scores["bright"], 3)
    expected = bank.h(top).double().mean(0) - bank.h(bottom).double().mean(0)
    assert torch.allclose(d.delta.double(), expected, atol=1e-6)
    assert d.meta["params"]["positive_seeds"] == top and d.name == "bright"
    with pytest.raises(HspaceError, match="no 'smile'; valid: bright, red"):
        direction_from_scores(bank, "smile", 3, scores="mine")
    with pytest.raises(HspaceError, match="no domain is registered for model .tiny-test."):
        annotate_bank(bank)


def test_labels_csv_and_x_T_space(tmp_path, engine, trajectory):
    from hspace.directions.supervised import edit_x_T, read_labels, x_T_difference

    path = tmp_path / "l.csv"
    path.write_text("seed,label\n3,1\n11,no\n\n42,+\n")
    assert read_labels(path) == ("seed", [3, 11, 42], [True, False, True])
    path.write_text("image,label\nfaces/a.png,true\nb.png,0\n")
    kind, items, labels = read_labels(path)
    assert kind == "image" and items == [tmp_path / "faces" / "a.png", tmp_path / "b.png"] and labels == [True, False]
    for text, message in [
        ("seed,label\n1,maybe\n", "label 'maybe' is not one of"),
        ("name,label\n1,1\n", "header 'seed,label' or 'image,label'"),
        ("seed,label\n1,1\n2,1\n", "needs positive and negative examples"),
        ("seed,label\nx,1\n", "seed 'x' is not an integer"),
    ]:
        path.write_text(text)
        with pytest.raises(HspaceError, match=message):
            read_labels(path)

    delta = x_T_difference(trajectory[[0, 2]], trajectory[[1]])
    assert torch.allclose(delta, (trajectory.x_T[[0, 2]].double().mean(0) - trajectory.x_T[1].double()), atol=1e-12)
    images = edit_x_T(engine, trajectory, delta, [0.0, 0.5])
    tolerance = composition_tolerance(engine, trajectory)  # 6 rows in one batch vs 3, and 1 (conftest)
    assert (images[0] - trajectory.images).abs().max() <= tolerance  # scale 0 is the sample itself
    moved = engine.sample([3], trajectory.num_steps, 1.0)
    moved.x_T = moved.x_T + 0.5 * delta.float()
    assert (images[1, :1] - engine.replay(moved).images).abs().max() <= tolerance
    # K directions stacked: one run, each direction's images as if edited alone
    stacked = edit_x_T(engine, trajectory, torch.stack([delta, -2 * delta]), [0.5])
    assert stacked.shape == (2, 1, *trajectory.images.shape)
    assert (stacked[0, 0] - images[1]).abs().max() <= tolerance
    assert (stacked[1, 0] - edit_x_T(engine, trajectory, -delta, [1.0])[0]).abs().max() <= tolerance
    with pytest.raises(HspaceError, match=r"K of them stacked"):
        edit_x_T(engine, trajectory, delta[..., :2], [1.0])


def test_supervised_from_a_csv_of_seeds(tmp_path):
    from hspace.cli import main
    from hspace.engine import Engine

    (tmp_path / "smile.csv").write_text("seed,label\n0,1\n1,1\n2,0\n")
    assert main(["supervised", "--labels", str(tmp_path / "smile.csv"), "--model", "tiny-random", "--steps", "2", "--out", str(tmp_path / "o")]) == 0
    d = Direction.load(tmp_path / "o" / "smile.safetensors")
    t = Engine.load("tiny-random", device="cpu").sample([0, 1, 2], 2, 1.0)
    assert torch.allclose(d.delta, t.h[:2].mean(0) - t.h[2], atol=1e-5)


def test_flip_rates_push_each_sample_towards_the_opposite_label(engine):
    from hspace.card import flip_rates, mean_off_target

    t = engine.sample(range(6), 3, 1.0)
    threshold = float(t.images.mean(dim=(1, 2, 3)).median())

    def classify(images):
        m = images.mean(dim=(1, 2, 3))
        return {"bright": torch.sigmoid(50 * (m - threshold)), "red": torch.sigmoid(50 * images[:, 0].mean(dim=(1, 2)))}

    d = mean_difference(t[[0, 1]], t[[2, 3]], name="bright")
    report = flip_rates(engine, t, {"bright": d}, 2.0, classify, watch=["red"])
    before = classify(t.images)
    flipped, red = [], []
    for i in range(6):
        sign = -1.0 if before["bright"][i] > 0.5 else 1.0
        after = classify(engine.replay(t[[i]], d, scale=2.0 * sign).images)
        flipped.append(bool((after["bright"][0] > 0.5) != (before["bright"][i] > 0.5)))
        red.append(bool((after["red"][0] > 0.5) != (before["red"][i] > 0.5)))
    assert report["attributes"]["bright"]["flipped"] == pytest.approx(sum(flipped) / 6)
    assert report["attributes"]["bright"]["others_flipped"] == {"red": pytest.approx(sum(red) / 6)}
    assert mean_off_target(report) == pytest.approx(sum(red) / 6)


def _tiny_clip(folder):
    import json

    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)


def test_clip_scorer_is_the_softmax_of_each_prompt_pair(tmp_path, engine):
    pytest.importorskip("transformers")
    from transformers import CLIPModel, CLIPTokenizer

    from hspace.cli import main
    from hspace.directions.supervised import clip_scorer

    _tiny_clip(tmp_path)
    prompts = {"smile": ("a smiling face", "a face"), "hat": ("a face with a hat", "a face")}
    scorer = clip_scorer(str(tmp_path), prompts)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    scores = scorer(images)
    # The same through CLIPModel's own forward: logits_per_image over the four prompts.
    model, tokenizer = CLIPModel.from_pretrained(tmp_path).eval(), CLIPTokenizer.from_pretrained(tmp_path)
    x = torch.nn.functional.interpolate((images + 1) / 2, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    tokens = tokenizer(["a smiling face", "a face", "a face with a hat", "a face"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**tokens, pixel_values=(x - mean) / std).logits_per_image
    assert torch.allclose(scores["smile"], logits[:, :2].softmax(-1)[:, 0], atol=1e-5)
    assert torch.allclose(scores["hat"], logits[:, 2:].softmax(-1)[:, 0], atol=1e-5)

    bank = build_bank(tmp_path / "b", engine, 4, 2, shard_size=4)
    argv = ["annotate", str(tmp_path / "b"), "--clip", str(tmp_path), "--name", "clip", "--prompt"]
    assert main([*argv, "smile=a smiling face|a face"]) == 0
    assert torch.allclose(bank.scores("clip")["smile"], clip_scorer(str(tmp_path), {"smile": prompts["smile"]})(bank.thumbnails().float() / 127.5 - 1)["smile"], atol=1e-6)
    assert main([*argv, "smile=a smiling face"]) == 2


def test_clip_scorer_prepares_images_with_the_folders_own_processor(tmp_path):
    """With a preprocessor_config.json, images go through the folder's CLIPImageProcessor (resize of the
    shortest side, centre crop, normalisation), as transformers' reference pipeline prepares them."""
    pytest.importorskip("transformers")
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from hspace.directions.supervised import clip_scorer

    _tiny_clip(tmp_path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4])
    processor.save_pretrained(tmp_path)
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1  # not square: the crop matters
    scores = clip_scorer(str(tmp_path), {"smile": ("a smiling face", "a face")})(images)
    model, tokenizer = CLIPModel.from_pretrained(tmp_path).eval(), CLIPTokenizer.from_pretrained(tmp_path)
    pixels = [((im + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy() for im in images]
    with torch.no_grad():
        logits = model(**tokenizer(["a smiling face", "a face"], padding=True, return_tensors="pt"),
                       pixel_values=processor(images=pixels, return_tensors="pt")["pixel_values"]).logits_per_image
    assert torch.allclose(scores["smile"], logits.softmax(-1)[:, 0], atol=1e-5)
    # the plain resize (no processor file) gives other numbers: the processor was really used
    (tmp_path / "preprocessor_config.json").unlink()
    assert not torch.allclose(clip_scorer(str(tmp_path), {"smile": ("a smiling face", "a face")})(images)["smile"], scores["smile"], atol=1e-4)


def test_a_card_with_a_clip_scorer_scores_prompt_pairs_and_measures_image_similarity(tmp_path, engine, trajectory):
    """The text-to-image card (a tiny random CLIP: its numbers mean nothing; the plumbing, the shapes and the
    similarity's arithmetic are what is checked)."""
    pytest.importorskip("transformers")
    from hspace.card import card
    from hspace.cli import main
    from hspace.directions.direction import Direction
    from hspace.directions.supervised import clip_scorer

    _tiny_clip(tmp_path)
    prompts = {"smile": ("a smiling face", "a face"), "hat": ("a face with a hat", "a face")}
    scorer = clip_scorer(str(tmp_path), prompts)
    direction = Direction(torch.randn(6, *engine.h_shape, generator=torch.Generator().manual_seed(0)), meta={"name": "smile"}, spec=engine.spec)
    result = card(direction, engine, trajectory=trajectory, scales=[-4.0, 4.0], scorer=scorer, progress=False)
    assert result.target == "smile" and set(result.change) == {"smile", "hat"} and set(result.binary) == {"smile", "hat"}
    assert len(result.similarity) == len(result.scales) and result.similarity[result.scales.index(0.0)] == pytest.approx(1.0, abs=1e-6)
    # the similarity is the mean cosine of CLIP image embeddings, edited vs unedited, recomputed here at the last scale
    edited = engine.edit(trajectory, direction, [result.scales[-1]], progress=False).images[0, 0]
    expected = (scorer.embed(edited) * scorer.embed(trajectory.images)).sum(-1).mean()
    assert result.similarity[-1] == pytest.approx(float(expected), abs=1e-5) and result.similarity[-1] < 1.0
    assert "CLIP similarity to the unedited image" in result.markdown()

    from hspace.engine import Engine

    other = Engine.load("tiny-random")  # the CLI loads its model by name: a direction of that model
    Direction(torch.randn(6, *other.h_shape), meta={"name": "smile"}, spec=other.spec).save(tmp_path / "smile.safetensors")
    out = tmp_path / "card"
    # the CLI: --scorer clip:DIR --attributes NAME='with|without'

    argv = ["card", str(tmp_path / "smile.safetensors"), "--model", "tiny-random", "--steps", "2", "--n", "2", "--scales", "-1", "1",
            "--scorer", f"clip:{tmp_path}", "--out", str(out)]
    assert main([*argv, "--attributes", "smile=a smiling face|a face", "hat=a face with a hat|a face"]) == 0
    written = json.loads((out / "card.json").read_text())
    assert written["target"] == "smile" and len(written["similarity"]) == 3 and set(written["flip"]) == {"smile", "hat"}
    assert main([*argv, "--attributes", "smile=a smiling face"]) == 2  # not a pair: a clear error, exit 2
