"""What turns embeddings or images into abnormality probabilities: the scoring contract (`contract`), the heads
on embeddings, ensembles, study pooling, the zero-shot prompt classifier and the conventional baselines. Estimators
only: the protocol decides and the workflows write runs."""
