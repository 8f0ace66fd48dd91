"""The settings of the trainer tests' runs: small enough for a shared 2-core CPU (32-pixel images, one
thread, no worker processes)."""

from training.config import TrainConfig

FAST = dict(preset="tiny", image_size=32, context_length=16, vocab_size=400, batch_size=16, workers=0, threads=1,
            warmup_steps=2, lr=1e-3, log_every=1, progress=False, holdout_fraction=0.05)


def fast_config(raw_pairs, output, **kw) -> TrainConfig:
    return TrainConfig(input=str(raw_pairs), output=str(output), **{**FAST, **kw})
