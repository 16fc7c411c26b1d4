"""The diffusion model: UNet architecture, noise schedule and sampling, as separate pieces."""
