"""The bundled CLIP trainer: reads the exported shards and uses what curation produced.

Flat modules, one purpose each: `config` (settings), `data` (shard stream),
`text_sampling`, `image_transforms`, `tokenizer`, `model` (CLIPModel presets),
`loss`, `optimization`, `loop` (the run), `checkpoint`, `evaluate`,
`metrics_log`, `distributed`, `cli`. `optim/` holds the low-bit optimizers.
"""
