"""polyinr: Poly-INR (Singh et al., CVPR 2023) on ImageNet as a reproducible pipeline."""

__version__ = "0.1.0"
