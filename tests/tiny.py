"""The tiny generator shape the unit tests share; vary it with dataclasses.replace."""

from polyinr.core.config import GeneratorConfig

TINY_GENERATOR = GeneratorConfig(
    conditional=True,
    num_classes=3,
    z_dim=8,
    w_dim=16,
    embed_dim=12,
    cond_dim=8,
    mapping_lr_mult=0.1,
    hidden=16,
    levels=4,
    clamp=256.0,
    w_avg_beta=0.9,
    mixing="plain",
)
