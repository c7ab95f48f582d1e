"""Why does a toysd model ignore some prompt phrases? Two measurements of a toysd folder (default: the bundled one).

1. Text encoder: the distance of each one-phrase caption's encoder output (all 32 token states, as the U-Net's
   cross-attention reads them) from the empty caption's. A phrase whose output sits near the empty caption's gives
   classifier-free guidance nothing to push with: cond and uncond predictions agree.
2. Denoiser: on training faces noised to t, how much smaller the x_0 error is under the true phrase than under the
   empty caption, per polarity ("+": faces that have the attribute, under its positive phrase; "-": the others,
   under the negative phrase). A phrase the model has learnt lowers the error at the noise levels where the
   attribute is still open.

    python benchmarks/toysd_prompt_diagnosis.py [FOLDER] [--n 128]
"""

from __future__ import annotations

import argparse

import torch

from hspace.loading import BUNDLED_FOLDERS
from hspace.toyfaces import captions
from hspace.toyfaces.quality import training_labels
from hspace.toyfaces.toysd import sd_alphas
from hspace.toyfaces.train import render_pool


def main() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", default=BUNDLED_FOLDERS["toysd"])
    parser.add_argument("--n", type=int, default=128, help="training faces (seeds 0 ..) for the denoiser's errors")
    args = parser.parse_args()
    folder = str(args.folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder + "/tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder + "/text_encoder").float().eval()
    unet = UNet2DConditionModel.from_pretrained(folder + "/unet").float().eval()
    vae = AutoencoderKL.from_pretrained(folder + "/vae").float().eval()

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, padding="max_length", max_length=captions.MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids).last_hidden_state

    phrases = [(name, polarity, captions.caption({name: polarity})) for name in captions.BINARY_PHRASES for polarity in (True, False)]
    with torch.no_grad():
        states = encode(["", captions.SUBJECT] + [p for _, _, p in phrases])
        print("| caption | distance of its encoder output from the empty caption's |\n|---|---|")
        for text, state in zip([captions.SUBJECT] + [p for _, _, p in phrases], states[1:]):
            print(f"| {text} | {float((state - states[0]).norm()):.2f} |")

        labels = training_labels(args.n)
        latents = vae.encode(render_pool(args.n, 32).float() / 127.5 - 1).latent_dist.mean * vae.config.scaling_factor
        alphas = sd_alphas()
        levels = (300, 500, 700, 900)
        print("\n| phrase | faces | " + " | ".join(f"x_0 error gain at t={t}" for t in levels) + " |\n|---|---|" + "---|" * len(levels))
        for (name, polarity, text), phrase_state in zip(phrases, states[2:]):
            mask = torch.from_numpy(labels[name] > 0.5) == polarity
            z0, k = latents[mask], int(mask.sum())
            cells = []
            for t in levels:
                noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(t))
                a = alphas[t]
                x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
                errors = []
                for state in (phrase_state, states[0]):  # the phrase, then the empty caption
                    eps = unet(x_t, torch.full((k,), t), encoder_hidden_states=state.expand(k, -1, -1)).sample
                    errors.append(float((((x_t - (1 - a).sqrt() * eps) / a.sqrt() - z0) ** 2).mean()))
                cells.append(f"{100 * (errors[1] - errors[0]) / errors[1]:+.1f}%")
            print(f"| {text} | {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
