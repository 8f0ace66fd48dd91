"""The bundled CLIP trainer: reads the exported shards and uses what curation produced.

Flat modules, one purpose each: `config` (settings), `shard_set` (footer
checks, units of work), `data` (shard stream and loader), `online_curation`
(MetaCLIP balancing in the loader), `text_sampling`, `image_transforms`,
`tokenizer`, `model` (CLIPModel presets), `loss`, `step` (one optimizer step,
shared with the benchmark), `optimization`, `loop` (the run), `checkpoint`,
`evaluate`, `metrics_log`, `distributed`, `demo_shards` (Beam-free demo
input), `cli`. `optim/` holds the low-bit optimizers.
"""
