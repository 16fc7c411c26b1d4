"""The label-efficiency methods in the words every report uses (tables, figures, MLflow notes).

Its own module so that figures outside the label-efficiency stage (the pretraining-compute curve)
name the methods the same way without importing that stage.
"""

from __future__ import annotations

METHOD_NAMES = {
    "residual": "residual MLP head on frozen DDPM features",
    "ensemble": "DDPM-Seg MLP ensemble on frozen DDPM features",
    "finetune": "pretrained denoiser fine-tuned as segmenter",
    "finetune_random": "same network from random init",
    "dense_decoder": "conv decoder on frozen DDPM feature maps",
    "scratch_unet": "small UNet from scratch",
}
