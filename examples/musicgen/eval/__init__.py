"""Evaluation: held-out NLL and KL, generation, FAD/CLAP per embedder, the ablation, codec figures."""
