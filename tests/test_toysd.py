"""toysd, the text-to-image toy: its caption grammar and tokenizer, its two-stage training (resumed exactly), its export as
a folder that diffusers' StableDiffusionPipeline loads unchanged, and the bundled model following its prompts."""

from collections import Counter

import numpy as np
import pytest
import torch

from hspace import Engine, HspaceError
from hspace.toyfaces import captions, toysd
from hspace.toyfaces.captions import caption
from hspace.toyfaces.toysd import train
from hspace.toyfaces.train import TrainConfig
from hspace.trajectory import seeded_x_T


def test_a_caption_without_rng_names_exactly_the_attributes_given_in_a_fixed_order():
    assert caption({}) == "a face"
    assert caption({"smile": True}) == "a face, smiling"
    assert caption({"hat": False, "smile": False}) == "a face, neutral, without a hat"
    full = {"smile": True, "eyes_open": False, "glasses": True, "hat": True, "hair_color": 0.9, "skin_tone": 0.5, "yaw": -0.9, "background": 0.66}
    assert caption(full) == ("a face, smiling, eyes closed, with glasses, with a hat, blonde hair, medium skin, facing left, blue background")
    # the continuous words split the range evenly; the background hue is the nearest sixth of the circle (1.0 is 0.0)
    assert [captions.phrase("hair_color", v) for v in (0.0, 0.3, 0.6, 1.0)] == ["black hair", "brown hair", "auburn hair", "blonde hair"]
    assert [captions.phrase("yaw", v) for v in (-1.0, 0.0, 0.34, 1.0)] == ["facing left", "facing front", "facing right", "facing right"]
    assert [captions.phrase("background", v) for v in (0.0, 0.08, 0.99, 1 / 3, 0.5)] == [
        "red background", "red background", "red background", "green background", "cyan background"]


@pytest.mark.parametrize("bad, match", [({"smile": "yes"}, "smile must be True or False"), ({"mood": True}, "unknown attribute 'mood'"),
                                        ({"yaw": 3.0}, r"yaw must be in \[-1.0, 1.0\], got 3.0")])
def test_a_bad_attribute_names_itself_and_what_is_valid(bad, match):
    with pytest.raises(HspaceError, match=match):
        caption(bad)


def test_training_captions_drop_each_phrase_and_leave_the_caption_empty_at_their_rates():
    rng = np.random.default_rng(0)
    attributes = {"smile": True, "eyes_open": True, "glasses": False, "hat": False, "hair_color": 0.1, "skin_tone": 0.1, "yaw": 0.0, "background": 0.5}
    drawn = [caption(attributes, rng, drop=0.3, empty=0.1) for _ in range(20000)]
    empty = sum(d == "" for d in drawn) / len(drawn)
    assert abs(empty - 0.1) < 0.01
    named = Counter(p for d in drawn if d for p in d.split(", ")[1:])
    kept = {p: c / sum(1 for d in drawn if d) for p, c in named.items()}
    assert set(kept) == {captions.phrase(k, v) for k, v in attributes.items()}
    assert all(abs(k - 0.7) < 0.015 for k in kept.values()), kept
    # the phrases that survive keep the grammar's order
    assert all(d == caption({k: attributes[k] for k in attributes if captions.phrase(k, attributes[k]) in d.split(", ")}) for d in drawn[:500] if d)


def test_the_tokenizer_reads_every_word_as_one_token_and_falls_back_to_letters(tmp_path):
    tokenizer = captions.write_tokenizer(tmp_path / "tok")
    longest = caption({"smile": False, "eyes_open": False, "glasses": False, "hat": False, "hair_color": 0.5, "skin_tone": 0.5, "yaw": 0.5, "background": 0.5})
    tokens = tokenizer.tokenize(longest)
    assert tokens == [w + "</w>" for w in longest.replace(",", " ,").split()]
    assert len(tokenizer(longest).input_ids) <= captions.MAX_TOKENS
    assert tokenizer.tokenize("a dog") == ["a</w>", "d", "o", "g</w>"]  # an unknown word: its letters
    from transformers import CLIPTokenizer

    again = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert again(longest).input_ids == tokenizer(longest).input_ids and again.model_max_length == captions.MAX_TOKENS


def small_sd(steps, vae_steps=4, decoder_steps=0):
    return TrainConfig(arch="sd", steps=steps, vae_steps=vae_steps, decoder_steps=decoder_steps, batch_size=4, pool=32, warmup=2,
                       checkpoint_every=2, channels="16,32")


class Interrupt(Exception):
    pass


def stop_at(stage, step):
    def callback(info):
        if info["stage"] == stage and info["step"] == step:
            raise Interrupt
    return callback


def test_every_stage_resumes_exactly_after_an_interruption_in_each(tmp_path):
    train(tmp_path / "once", small_sd(4, decoder_steps=4))
    for stage in ("vae", "unet", "decoder"):  # a session ends mid-stage (after a checkpoint); the same command resumes it
        with pytest.raises(Interrupt):
            train(tmp_path / "twice", small_sd(4, decoder_steps=4), callback=stop_at(stage, 3))
    train(tmp_path / "twice", small_sd(4, decoder_steps=4))
    for name in ("vae.pt", "checkpoint.pt", "decoder.pt"):
        once = torch.load(tmp_path / "once" / name, weights_only=True)
        twice = torch.load(tmp_path / "twice" / name, weights_only=True)
        assert once["step"] == twice["step"] == 4
        for key in once["ema"]:
            assert torch.equal(once["ema"][key], twice["ema"][key]), (name, key)
    # the decoder's fine-tuning leaves the encoder, and so the latents the U-Net learnt, exactly as they were
    vae, decoder = (torch.load(tmp_path / "once" / n, weights_only=True)["ema"] for n in ("vae.pt", "decoder.pt"))
    assert all(torch.equal(vae[k], decoder[k]) for k in vae if k.startswith(("encoder.", "quant_conv.")))
    assert not torch.equal(vae["decoder.conv_out.weight"], decoder["decoder.conv_out.weight"])
    with pytest.raises(HspaceError, match="resume it with the same settings"):
        train(tmp_path / "twice", TrainConfig(**{**small_sd(4, decoder_steps=4).__dict__, "caption_drop": 0.5}))
    # a decoder stage added to a finished run: the earlier stages are kept, only the decoder trains
    train(tmp_path / "more", small_sd(4))
    before = torch.load(tmp_path / "more" / "checkpoint.pt", weights_only=True)["ema"]
    train(tmp_path / "more", small_sd(4, decoder_steps=2))
    after = torch.load(tmp_path / "more" / "checkpoint.pt", weights_only=True)["ema"]
    assert all(torch.equal(before[k], after[k]) for k in before) and (tmp_path / "more" / "decoder.pt").is_file()


@pytest.mark.parametrize("settings", [{"v_weight_cap": 10.0}, {"region_weights": "mouth=4,eyes=2", "text_attribute_weight": 0.5}])
def test_the_sd_loss_options_weight_the_first_loss_as_recomputed_by_hand(tmp_path, settings):
    """--v-weight-cap (per timestep), --region-weights (per latent cell) and --text-attribute-weight (the encoder's head's
    cross-entropy on what each caption names) on --arch sd: the U-Net stage's first loss, recomputed by hand from the
    run's seeded draws."""
    from transformers import CLIPTokenizer

    from hspace.toyfaces.quality import training_labels
    from hspace.toyfaces.toysd import TextToImage, encode_pool, named_classes, scaling_factor, sd_alphas
    from hspace.toyfaces.train import loss_weight_map, render_pool, timestep_weights

    config = TrainConfig(**{**small_sd(1).__dict__, **settings})
    losses = []
    train(tmp_path / "run", config, callback=lambda info: losses.append(info["loss"]) if info["stage"] == "unet" else None)
    vae = toysd.build_vae()
    vae.load_state_dict(torch.load(tmp_path / "run" / "vae.pt", weights_only=True)["ema"])
    latents = encode_pool(vae, render_pool(config.pool, config.size), "cpu")
    labels = training_labels(config.pool)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path / "run" / "tokenizer"))
    torch.manual_seed(config.seed)
    model = TextToImage(config, len(tokenizer))
    generator = torch.Generator().manual_seed(config.seed)
    index = torch.randint(0, len(latents), (config.batch_size,), generator=generator)
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    texts = [captions.caption(toysd._typed({n: labels[n][i] for n in captions.ORDER}), rng, drop=config.caption_drop) for i in index.tolist()]
    alphas = sd_alphas()
    t = torch.randint(0, len(alphas), (config.batch_size,), generator=generator)
    noise = torch.randn(latents[index].shape, generator=generator)
    a = alphas[t].view(-1, 1, 1, 1)
    z0 = latents[index] * scaling_factor(latents)
    ids = torch.tensor([tokenizer(x, padding="max_length", max_length=captions.MAX_TOKENS, truncation=True).input_ids for x in texts])
    with torch.no_grad():
        text = model.text_encoder(ids)
        error = (model.unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=text.last_hidden_state).sample - noise) ** 2
        logits = model.attribute_head(text.pooler_output).view(len(texts), 4, 3) if "text_attribute_weight" in settings else None
    plain = float(error.mean())
    if "v_weight_cap" in settings:
        expected = float((error * timestep_weights(alphas, 10.0)[t].view(-1, 1, 1, 1)).mean())
    else:
        cells = loss_weight_map("mouth=4,eyes=2", 16)
        assert cells.shape == (1, 1, 16, 16) and cells.max() == 5  # mouth cells count 5 times, eye cells 3 times
        named = torch.tensor([named_classes(x) for x in texts])
        assert named.ne(0).any()  # some caption names a binary attribute
        expected = float((error * cells).mean() / cells.mean()) + 0.5 * float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), named.flatten()))
    assert losses[0] == pytest.approx(expected, rel=1e-4)
    assert losses[0] != pytest.approx(plain, rel=1e-2)  # the weights did change the loss


def test_vae_init_takes_a_folders_autoencoder_as_the_finished_first_stage_and_trains_the_unet_from_scratch(tmp_path):
    from diffusers import AutoencoderKL

    train(tmp_path / "a", small_sd(1))
    toysd.export(tmp_path / "a", tmp_path / "folder")
    losses = []
    train(tmp_path / "b", TrainConfig(**{**small_sd(1).__dict__, "vae_init": str(tmp_path / "folder"), "seed": 1}),
          callback=lambda info: losses.append(info["stage"]))
    assert losses == ["unet"]  # the autoencoder stage did not train
    taken = torch.load(tmp_path / "b" / "vae.pt", weights_only=True)
    exported = AutoencoderKL.from_pretrained(str(tmp_path / "folder" / "vae")).float().state_dict()
    assert taken["step"] == 4 and all(torch.equal(taken["ema"][k], exported[k]) for k in exported)
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True)["ema"] for r in ("a", "b"))
    assert not torch.equal(a["unet.conv_in.weight"], b["unet.conv_in.weight"])  # the U-Net was not the folder's
    with pytest.raises(HspaceError, match="settings of --arch sd"):
        TrainConfig(text_attribute_weight=0.1)
    with pytest.raises(HspaceError, match="--vae-init its autoencoder alone"):
        TrainConfig(**{**small_sd(1).__dict__, "vae_init": "toysd", "init": "toysd"})


def test_what_a_caption_names_of_each_binary_attribute():
    from hspace.toyfaces.toysd import named_classes

    assert named_classes(caption({"smile": True, "hat": False})) == [1, 0, 0, 2]
    assert named_classes(caption({"eyes_open": False, "glasses": True, "hair_color": 0.9})) == [0, 2, 1, 0]
    assert named_classes("") == named_classes(caption({})) == [0, 0, 0, 0]
    assert named_classes(caption({"hat": True})) == [0, 0, 0, 1]  # 'with a hat' is not read inside 'without a hat'


@pytest.mark.parametrize("field, value, match", [("channels", "16,32,64", "two multiples of 16"), ("caption_drop", 1.5, "caption_drop must be a finite number from 0 to 1"),
                                                 ("vae_steps", 0, "vae_steps"), ("v_weight_cap", 0.5, "v_weight_cap must be a finite number >= 1"),
                                                 ("text_attribute_weight", -1.0, "text_attribute_weight must be a finite number >= 0"),
                                                 ("vae_init", "nowhere", "--vae-init 'nowhere' is not a toysd pipeline folder: it has no vae"),
                                                 ("region_weights", "nose=2", "nose")])
def test_a_bad_sd_setting_is_refused_before_any_work(tmp_path, field, value, match):
    with pytest.raises(HspaceError, match=match):
        train(tmp_path / "run", TrainConfig(**{**small_sd(4).__dict__, field: value}))
    assert not (tmp_path / "run").exists()


def test_the_export_is_a_float16_pipeline_diffusers_loads_and_the_engine_samples_as_diffusers_does(tmp_path):
    from diffusers import StableDiffusionPipeline

    from hspace.toyfaces.toysd import export

    train(tmp_path / "run", small_sd(2, vae_steps=2))
    folder = export(tmp_path / "run", tmp_path / "toysd")
    from safetensors.torch import load_file

    stored = [load_file(str(f)) for f in sorted(folder.glob("*/*.safetensors"))]
    assert len(stored) == 3 and {w.dtype for weights in stored for w in weights.values()} == {torch.float16}
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float16)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["ema"]
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], state["unet.conv_in.weight"].half())
    assert pipe.vae.config.scaling_factor > 0 and pipe.tokenizer.model_max_length == captions.MAX_TOKENS
    pipe = pipe.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    engine = Engine.load(str(folder), guidance=5.0)
    ours = engine.sample([3], 4, 0.0, prompts=["a face, smiling"], progress=False).images
    x_T = seeded_x_T(3, engine.sample_shape)[None]
    theirs = pipe("a face, smiling", num_inference_steps=4, guidance_scale=5.0, eta=0.0, latents=x_T, output_type="pt", height=32, width=32).images
    assert ours.shape == (1, 3, 32, 32)
    assert float((ours.clamp(-1, 1) - (theirs * 2 - 1)).abs().max()) < 1e-4  # (the pipeline clamps its output)
    # --init FOLDER goes on training an exported pipeline: its autoencoder is the run's finished first stage, its U-Net and
    # text encoder the second's start (at a learning rate too small to move them, the weights stay the export's)
    stages = []
    more = TrainConfig(**{**small_sd(2, vae_steps=2).__dict__, "init": str(folder), "lr": 1e-12})
    train(tmp_path / "more", more, callback=lambda info: stages.append(info["stage"]))
    assert stages == ["unet", "unet"]  # no autoencoder stage ran
    vae = torch.load(tmp_path / "more" / "vae.pt", weights_only=True)["ema"]
    assert all(torch.equal(vae[k], w.float()) for k, w in pipe.vae.state_dict().items())
    started = torch.load(tmp_path / "more" / "checkpoint.pt", weights_only=True)["model"]
    assert float((started["unet.conv_in.weight"] - pipe.unet.state_dict()["conv_in.weight"].half().float()).abs().max()) < 1e-6
    with pytest.raises(HspaceError, match=r"U-Net channels \[16, 32\].*the run builds \[32, 64\]"):
        train(tmp_path / "wider", TrainConfig(**{**more.__dict__, "channels": "32,64"}))
    with pytest.raises(HspaceError, match=r"1 layers per block.*the run builds \[16, 32\], 2,"):
        train(tmp_path / "deeper", TrainConfig(**{**more.__dict__, "layers_per_block": 2}))
    with pytest.raises(HspaceError, match="is not a toysd pipeline folder: it has no unet, text_encoder, vae"):
        train(tmp_path / "none", TrainConfig(**{**more.__dict__, "init": str(tmp_path)}))


# ---- the bundled toysd ----

STEPS = 10


@pytest.fixture(scope="module")
def bundled():
    from hspace.loading import TOYSD_FOLDER

    return TOYSD_FOLDER


def smiles(images) -> torch.Tensor:
    from hspace.toyfaces.classifier import classify

    return classify(images)["smile"] > 0.5


@pytest.mark.xfail(reason="the bundled toysd is undertrained: smiling 53% at guidance 5 (docs/text_to_image.md); re-pin after more training", strict=False)
def test_diffusers_loads_the_bundled_toysd_unchanged_and_its_faces_follow_the_prompt(bundled):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(bundled), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    drawn = {}
    for prompt in ("a face, smiling", "a face, neutral"):
        generator = [torch.Generator().manual_seed(s) for s in range(16)]
        images = pipe([prompt] * 16, num_inference_steps=STEPS, guidance_scale=5.0, generator=generator, output_type="pt").images
        assert images.shape == (16, 3, 32, 32)
        drawn[prompt] = smiles(images * 2 - 1)
    assert int(drawn["a face, smiling"].sum()) >= 14 and int(drawn["a face, neutral"].sum()) <= 2


@pytest.mark.xfail(reason="the bundled toysd is undertrained: smiling 53% at guidance 5 (docs/text_to_image.md); re-pin after more training", strict=False)
def test_a_prompt_pair_direction_on_the_bundled_toysd_makes_most_of_16_neutral_faces_smile(bundled):
    from hspace.directions.prompts import prompt_direction

    engine = Engine.load("toysd", guidance=5.0)
    assert engine.h_shape == (128, 8, 8) and engine.image_size == (32, 32)
    slider = prompt_direction(engine, [("a face, smiling", "a face, neutral")], 16, STEPS, 0.0, batch_size=32, progress=False)
    base = engine.conditioned(prompt="a face").sample(range(100, 132), STEPS, 0.0, progress=False)
    without = [i for i, s in enumerate(smiles(base.images).tolist()) if not s][:16]
    assert len(without) == 16
    edited = engine.conditioned(prompt="a face").edit(base[without], slider, [0.0, 1.0], progress=False).images[0]
    assert torch.equal(edited[0], base[without].images)
    assert int(smiles(edited[1]).sum()) >= 12


def _curve(flip, side, pixel, identity, n=4):
    return {"flip": np.full(n, flip), "side": np.full(n, side), "pixel": np.full(n, pixel), "identity": np.full(n, identity)}


def test_a_direction_is_read_at_the_scale_where_its_identity_change_equals_the_prompt_edits():
    from hspace.toyfaces.text_edits import matched, read_at_matched_identity

    rows = np.arange(4)
    curves = [_curve(0.2, 0.1, 0.02, 0.01), _curve(0.6, 0.3, 0.06, 0.03), _curve(1.0, 0.5, 0.1, 0.05)]  # scales 1, 2, 4
    at = matched(curves, 0.02, rows, (1.0, 2.0, 4.0))  # halfway between scales 1 and 2
    assert at["reached"] and at["scale"] == pytest.approx(1.5) and at["flip"] == pytest.approx(0.4) and at["identity"] == pytest.approx(0.02)
    at = matched(curves, 0.005, rows, (1.0, 2.0, 4.0))  # below the first scale: from 0, where nothing changes
    assert at["scale"] == pytest.approx(0.5) and at["flip"] == pytest.approx(0.1) and at["side"] == pytest.approx(0.05)
    at = matched(curves, 0.2, rows, (1.0, 2.0, 4.0))  # never reached: read at the largest scale, and said so
    assert not at["reached"] and at["scale"] == 4.0 and at["flip"] == 1.0
    # samples differ: the matching follows the rows drawn, and the intervals hold the point estimate
    prompt_edit = {"flip": np.array([1.0, 1.0, 0.0, 1.0]), "side": np.array([0.0, 1 / 3, 0.0, 0.0]),
                   "pixel": np.full(4, 0.05), "identity": np.array([0.01, 0.03, 0.02, 0.02])}
    report = read_at_matched_identity(prompt_edit, {"prompt_pair": curves}, rows, (1.0, 2.0, 4.0), resamples=200)
    assert report["prompt_edit"]["flip"] == 0.75 and report["prompt_pair"]["scale"] == pytest.approx(1.5)
    low, high = report["prompt_pair"]["flip_interval"]
    assert low <= report["prompt_pair"]["flip"] <= high and low < high
    assert report["prompt_pair_minus_prompt_edit_flip"]["value"] == pytest.approx(0.4 - 0.75)


@pytest.mark.parametrize("flip, side, state", [((-0.05, 0.1), (-0.2, -0.05), "holds"), ((-0.3, -0.15), (-0.2, -0.05), "fails"),
                                               ((-0.05, 0.1), (0.02, 0.1), "fails"), ((-0.2, 0.1), (-0.2, -0.05), "undecided")])
def test_the_prompt_pair_verdict_is_three_way(flip, side, state):
    from hspace.toyfaces.text_edits import _verdict

    row = {"prompt_pair_minus_prompt_edit_flip": {"interval": list(flip)}, "prompt_pair_minus_prompt_edit_side": {"interval": list(side)}}
    assert _verdict(row)["state"] == state


def test_the_demos_text_to_image_section_draws_the_prompts_a_slider_and_its_card(tmp_path):
    from hspace.demo import Demo, _text_to_image

    demo = Demo(Engine.load("toyfaces"), None, tmp_path, steps=4)
    _text_to_image(demo, None)
    assert [name for name, _ in demo.figures] == ["toysd_prompts.png", "toysd_slider.png"]
    assert all((tmp_path / name).is_file() for name, _ in demo.figures)
    assert (tmp_path / "toysd_card" / "card.md").is_file() and "toysd_card/card.md" in demo.figures[-1][1]
    edits = demo.edits["toysd_slider"]
    drawn = Engine.load("toysd", guidance=5.0).sample(range(20, 25), 4, 0.0, progress=False,
                                                       prompts=["a face, neutral", "a face, with a hat", "a face, with glasses, black hair",
                                                                "a face, eyes closed, dark skin", "a face, facing left, blue background"])
    assert float((edits[0] - drawn.images).abs().max()) < 1e-4 and float((edits[2] - edits[0]).abs().max()) > 0.1


def test_a_comparison_folder_resumes_only_under_its_own_settings(tmp_path):
    import tiny_sd

    from hspace.toyfaces.text_edits import Study

    tiny_sd.sd_pipeline(tmp_path / "sd")
    engine = Engine.load(str(tmp_path / "sd"), guidance=5.0)
    Study(engine, tmp_path / "cmp", 8, 3, 16, 4, 500_000, False)
    Study(engine, tmp_path / "cmp", 8, 3, 16, 4, 500_000, False)  # the same settings: resumed
    with pytest.raises(HspaceError, match=r"holds a comparison of other settings \(n: 8 there, 16 now\)"):
        Study(engine, tmp_path / "cmp", 16, 3, 16, 4, 500_000, False)
    with pytest.raises(HspaceError, match="guidance: 5.0 there, 3.0 now"):
        Study(engine.conditioned(guidance=3.0), tmp_path / "cmp", 8, 3, 16, 4, 500_000, False)
    with pytest.raises(HspaceError, match="unconditional"):
        Study(Engine.load("tiny-random"), tmp_path / "other", 8, 3, 16, 4, 500_000, False)


def test_evaluate_on_toysd_reports_prompt_fidelity_the_autoencoder_and_the_training_frequencies(tmp_path, capsys):
    import json

    from hspace.cli import main

    out = tmp_path / "fidelity.json"
    assert main(["toyfaces", "evaluate", "--model", "toysd", "--guidance", "5", "--n", "4", "--steps", "3", "--eta", "0", "--json", str(out),
                 "--autoencoder-faces", "500"]) == 0
    report = json.loads(out.read_text())
    assert list(report["named"]) == ["a face, smiling", "a face, neutral", "a face, eyes open", "a face, eyes closed", "a face, with glasses",
                                     "a face, without glasses", "a face, with a hat", "a face, without a hat"]
    smiling = report["named"]["a face, smiling"]
    # the unnamed attributes' reference is the training faces given the named one: P(hat | smile) = 0.6 (render.py)
    assert abs(smiling["unnamed"]["hat"]["training_frequency_given_named"] - 0.6) < 0.01
    assert abs(smiling["unnamed"]["hat"]["training_frequency"] - 0.4) < 0.01
    assert all(0 <= row["agreement"] <= 1 for row in report["named"].values()) and report["guidance"] == 5.0
    # the bundled autoencoder keeps every attribute of at least 97% of held-out faces (the first 500: 99.0% of smiles kept; of 2,000: 99.25%)
    assert all(report["autoencoder_agreement"][a] >= 0.97 for a in ("smile", "eyes_open", "glasses", "hat"))
    assert "agreement" in capsys.readouterr().err
    assert main(["toyfaces", "compare-text", "--model", "toyfaces", "--out", str(tmp_path / "cmp")]) == 2
    assert "'toyfaces' is an unconditional model: guidance apply(ies) only to text-conditioned models" in capsys.readouterr().err
