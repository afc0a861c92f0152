"""Scoring a generator: the frozen feature networks (Inception, VGG16; `featurenets`), their
streamed statistics (`featurestats`), the reference statistics of the real data
(`reference`) and the metrics themselves, FID, sFID, IS, precision and recall (`metrics`).
Imports polyinr.core, polyinr.data and polyinr.model; never training or tracking."""
