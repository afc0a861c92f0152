"""Prefect flows that orchestrate the polyinr pipeline (DVC runs the stages)."""
