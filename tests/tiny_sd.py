"""A tiny random Stable-Diffusion-style ``UNet2DConditionModel`` for the layout and distillation tests (a few
thousand parameters, the two-digit model's block layout, 8-d cross-attention)."""

import torch


def tiny_config(size: tuple[int, int]) -> dict:
    """The tiny UNet's config on inputs of ``size`` (H, W)."""
    return dict(
        sample_size=size,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=8,
    )


def tiny_unet(size: tuple[int, int], seed: int = 0, **changes):
    """The tiny UNet with weights from ``seed`` (the global RNG is left as it was), frozen."""
    import diffusers

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return diffusers.UNet2DConditionModel(**(tiny_config(size) | changes)).eval().requires_grad_(False)
