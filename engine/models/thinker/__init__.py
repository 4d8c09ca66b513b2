"""The Ming "thinker": the BailingMoeV2 LLM with per-modality routers and 3-D video RoPE, the
vision and audio encoders with their projectors, and the tokenizer, chat format and multimodal
processor that turn conversations into its inputs."""
