"""The top layer, what users run: the `polyinr` command (`cli`), the evaluate stage
(`evaluate`), the MLflow Model Registry (`registry`) and the record that rebuilds a run from
storage (`pipeline`). Nothing in polyinr imports this package; flows/ and tests do."""
