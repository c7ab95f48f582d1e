"""Model wrappers: what the engine asks of a denoiser (its output, h's hook point, the decoder half at h).

A new kind of model (a conditional U-Net) enters as another wrapper with the same methods.
"""

from .unet import DecoderHalf, UNetModel

__all__ = ["DecoderHalf", "UNetModel"]
