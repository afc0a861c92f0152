"""The GAN itself: the Poly-INR generator (`generator`, the paper's equations; its fast
paths in `fast_synthesis`), the projected discriminator (`discriminator`), DiffAugment
(`augment`), the hinge loss (`loss`) and what is drawn from a trained generator (`sampling`,
`video`). Imports only polyinr.core: no file here reads data, storage or tracking."""
