"""A training run: the class-embedding init (`embedding`), the loop over images and the run's
lifecycle around it (`train`), checkpoints in storage (`checkpoints`), the local run folder
with its curves and event log (`rundir`) and the MLflow record (`tracking`; mlflow lives only
here). Imports every package below it: core, data, model, evaluation."""
