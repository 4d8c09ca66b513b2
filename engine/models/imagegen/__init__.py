"""The image generator of Ming-flash-omni 2.0 (spec §8): learned query tokens run through the thinker,
a bidirectional Qwen2 connector (+ ByT5 glyph embeddings for quoted text) turning their final-norm
hidden states into a condition, the Z-Image diffusion transformer with a flow-matching Euler scheduler,
and the image VAE. Editing adds the reference image's latent as a second frame; segmentation is an edit
whose result becomes a mask. The Preview's SD3-style DiT (spec §8.10) takes the Z-Image DiT's place when
the checkpoint ships it (`sd3`).

Modules: `config` (the checkpoint's mlp/, scheduler/ and byt5/ settings), `condition` (query tokens,
the thinker pass, connector), `glyph` (quoted text -> ByT5 embeddings), `diffusion` (caption features,
schedule, CFG Euler loop), `sd3` (the Preview's DiT and sampler), `buckets` (resolution buckets and
sizes), `preview` (cheap latent -> RGB), `segmentation` (prompt templates, mask recovery, overlay), `pipeline` (the named components loaded
from a checkpoint), `tiny` (the tiny demo head), `parity` (reference fixture runners).
"""
