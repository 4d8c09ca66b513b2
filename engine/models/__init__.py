"""The model graphs, one folder per model: `thinker/` (BailingMoeV2 LLM, ViTs, audio encoder,
projectors, tokenizer and prompt processor), `talker/` (speech, sound and music out) and
`imagegen/` (image generation, editing and segmentation). Plain PyTorch modules named like the
checkpoint; kernels live in engine.kernels, placement in engine.placement."""
