"""A deliberately plain BailingTalker2 for tests, written from the upstream rules (inclusionAI Ming 2.0
release 2a0c02a: modeling_bailing_talker.py, talker_module/{dit,aggregator,cfm,modules}.py, x_transformers'
RotaryEmbedding / apply_rotary_pos_emb; the Preview e58533d where `release="preview"`) and sharing nothing
with engine.models.talker: raw config dicts and a state dict in, the AR loop's patches out. Keys a config
omits take the upstream classes' keyword defaults (listed here). The LLM re-runs the whole sequence every
step (a KV cache only reproduces that); random draws come from a generator in the reference's order."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tests.models.talker.reference_qwen2 import qwen2_forward, qwen2_settings, qwen2_state_entries

# DiT.__init__ / Aggregator.__init__ keyword defaults (talker_module/dit.py, aggregator.py) and the DiTBlock
# keywords their **kwargs reach (modules.py).
DIT_DEFAULTS = {"in_channels": 64, "hidden_size": 1024, "depth": 28, "num_heads": 16, "mlp_ratio": 4.0,
                "llm_cond_dim": 896, "qk_norm": None, "pe_attn_head": None}
AGGREGATOR_DEFAULTS = {"in_channels": 64, "hidden_size": 1152, "depth": 28, "num_heads": 16, "mlp_ratio": 4.0,
                       "qk_norm": None, "pe_attn_head": None}
LATENT_DIM = 64          # BailingTalker2: self.latent_dim = 64
SPEAKER_DIM = 192        # spk_head = nn.Linear(192, hidden)
MAX_CACHE_LEN, MAX_STEPS = 2048, 1000
EPSS = {5: [0, 2, 4, 8, 16, 32], 6: [0, 2, 4, 6, 8, 16, 32], 7: [0, 2, 4, 6, 8, 16, 24, 32],
        10: [0, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32], 12: [0, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32],
        16: [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32]}


def talker_settings(talker: dict, llm: dict, release: str = "2.0") -> dict:
    c = {"llm": qwen2_settings(llm), "release": release, "steps": talker["steps"], "patch_size": talker["patch_size"]}
    c["flow"] = {**DIT_DEFAULTS, **talker["flowmodel"]}
    c["agg"] = {**AGGREGATOR_DEFAULTS, **talker["aggregator"], "llm_input_dim": c["llm"]["hidden_size"]}
    if release == "preview":
        c["history"], c["cfg_strength"] = c["patch_size"], talker["cfg_strength"]
    else:
        c["history"] = talker["history_patch_size"]
    return c


def _dit_blocks(d: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    h, hd = d["hidden_size"], d["hidden_size"] // d["num_heads"]
    inner, ff = hd * d["num_heads"], int(h * d["mlp_ratio"])
    out = {f"{prefix}rotary_embed.inv_freq": (len(range(0, hd, 2)),)}
    for i in range(d["depth"]):
        p = f"{prefix}blocks.{i}."
        out.update({p + "norm1.weight": (h,), p + "norm2.weight": (h,),
                    **{p + f"attn.to_{n}.weight": (inner, h) for n in "qkv"}, **{p + f"attn.to_{n}.bias": (inner,) for n in "qkv"},
                    p + "attn.to_out.0.weight": (h, inner), p + "attn.to_out.0.bias": (h,),
                    p + "mlp.ff.0.0.weight": (ff, h), p + "mlp.ff.0.0.bias": (ff,), p + "mlp.ff.2.weight": (h, ff),
                    p + "mlp.ff.2.bias": (h,)})
        if d["qk_norm"] == "rms_norm":
            out.update({p + "attn.q_norm.weight": (hd,), p + "attn.k_norm.weight": (hd,)})
    out[f"{prefix}final_layer.norm_final.weight"] = (h,)
    return out


def talker_state_entries(c: dict) -> dict[str, tuple[int, ...]]:
    f, a, hl = c["flow"], c["agg"], c["llm"]["hidden_size"]
    out = {**qwen2_state_entries(c["llm"], "model."), **_dit_blocks(f, "cfm.model."), **_dit_blocks(a, "aggregator."),
           "cfm.model.t_embedder.time_mlp.0.weight": (f["hidden_size"], 256), "cfm.model.t_embedder.time_mlp.0.bias": (f["hidden_size"],),
           "cfm.model.t_embedder.time_mlp.2.weight": (f["hidden_size"],) * 2, "cfm.model.t_embedder.time_mlp.2.bias": (f["hidden_size"],),
           "cfm.model.x_embedder.weight": (f["hidden_size"], f["in_channels"]), "cfm.model.x_embedder.bias": (f["hidden_size"],),
           "cfm.model.c_embedder.cond_embedder.weight": (f["hidden_size"], f["llm_cond_dim"]),
           "cfm.model.c_embedder.cond_embedder.bias": (f["hidden_size"],),
           "cfm.model.final_layer.linear.weight": (f["in_channels"], f["hidden_size"]),
           "cfm.model.final_layer.linear.bias": (f["in_channels"],),
           "aggregator.word_embedder.weight": (1, a["hidden_size"]),
           "aggregator.x_embedder.weight": (a["hidden_size"], a["in_channels"]), "aggregator.x_embedder.bias": (a["hidden_size"],),
           "aggregator.final_layer.linear.weight": (a["llm_input_dim"], a["hidden_size"]),
           "aggregator.final_layer.linear.bias": (a["llm_input_dim"],),
           "stop_head.weight": (2, hl), "stop_head.bias": (2,)}
    if c["release"] != "preview":
        out.update({"spk_head.weight": (hl, SPEAKER_DIM), "spk_head.bias": (hl,)})
    return out


def talker_buffers(c: dict) -> dict[str, torch.Tensor]:
    """x_transformers RotaryEmbedding(dim): the persistent inv_freq = 1 / 10000^(arange(0, dim, 2) / dim)."""
    out = {}
    for prefix, d in (("cfm.model.", c["flow"]), ("aggregator.", c["agg"])):
        dim = d["hidden_size"] // d["num_heads"]
        out[prefix + "rotary_embed.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    return out


def _rms(x, w):
    return F.rms_norm(x, (x.shape[-1],), weight=w, eps=1e-6)


def _rotate_pairs(x):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _rope(x, freqs):
    return (x * freqs.cos() + _rotate_pairs(x) * freqs.sin()).type(x.dtype)


def _blocks(x: torch.Tensor, sd: dict, prefix: str, d: dict) -> torch.Tensor:
    inv = sd[prefix + "rotary_embed.inv_freq"]
    t = torch.arange(x.shape[1]).type_as(inv)
    freqs = torch.einsum("i,j->ij", t, inv)
    freqs = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    heads, pn = d["num_heads"], d["pe_attn_head"]
    for i in range(d["depth"]):
        p = f"{prefix}blocks.{i}."
        h = _rms(x, sd[p + "norm1.weight"])
        b, n = h.shape[:2]
        q, k, v = (F.linear(h, sd[p + f"attn.to_{s}.weight"], sd[p + f"attn.to_{s}.bias"]) for s in "qkv")
        hd = k.shape[-1] // heads
        q, k, v = (y.view(b, n, heads, hd).transpose(1, 2) for y in (q, k, v))
        if d["qk_norm"] == "rms_norm":
            q, k = _rms(q, sd[p + "attn.q_norm.weight"]), _rms(k, sd[p + "attn.k_norm.weight"])
        if pn is None:
            q, k = _rope(q, freqs), _rope(k, freqs)
        else:
            q, k = q.clone(), k.clone()
            q[:, :pn], k[:, :pn] = _rope(q[:, :pn], freqs), _rope(k[:, :pn], freqs)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, heads * hd)
        x = x + F.linear(a, sd[p + "attn.to_out.0.weight"], sd[p + "attn.to_out.0.bias"])
        h = _rms(x, sd[p + "norm2.weight"])
        h = F.gelu(F.linear(h, sd[p + "mlp.ff.0.0.weight"], sd[p + "mlp.ff.0.0.bias"]), approximate="tanh")
        x = x + F.linear(h, sd[p + "mlp.ff.2.weight"], sd[p + "mlp.ff.2.bias"])
    h = _rms(x, sd[prefix + "final_layer.norm_final.weight"])
    return F.linear(h, sd[prefix + "final_layer.linear.weight"], sd[prefix + "final_layer.linear.bias"])


def dit(x, t, cond, his, sd, c):
    """DiT.forward: x [B, patch, 64], t [B], cond [B, 1, cond], his [B, H, 64] -> [B, 1 + H + patch, 64]."""
    p = "cfm.model."
    x = F.linear(torch.cat([his, x], dim=1), sd[p + "x_embedder.weight"], sd[p + "x_embedder.bias"])
    half = 128
    e = torch.exp(torch.arange(half).float() * -(math.log(10000) / (half - 1)))
    e = 1000 * t.unsqueeze(1) * e.unsqueeze(0)
    e = torch.cat((e.sin(), e.cos()), dim=-1).to(t.dtype)
    e = F.linear(F.silu(F.linear(e, sd[p + "t_embedder.time_mlp.0.weight"], sd[p + "t_embedder.time_mlp.0.bias"])),
                 sd[p + "t_embedder.time_mlp.2.weight"], sd[p + "t_embedder.time_mlp.2.bias"]).unsqueeze(1)
    y = e + F.linear(cond, sd[p + "c_embedder.cond_embedder.weight"], sd[p + "c_embedder.cond_embedder.bias"])
    return _blocks(torch.cat([y, x], dim=1), sd, p, c["flow"])


def aggregator(x, sd, c):
    """Aggregator.forward: latent patches [B, patch, 64] -> [B, 1, llm hidden] (the CLS output)."""
    x = F.linear(x, sd["aggregator.x_embedder.weight"], sd["aggregator.x_embedder.bias"])
    cls = sd["aggregator.word_embedder.weight"][torch.zeros(x.shape[0], 1, dtype=torch.long)]
    return _blocks(torch.cat([cls, x], dim=1), sd, "aggregator.", c["agg"])[:, :1]


def time_grid(steps: int, dtype=torch.float32) -> torch.Tensor:
    knots = EPSS.get(steps)
    t = torch.linspace(0, 1, steps + 1, dtype=dtype) if knots is None else 1 / 32 * torch.tensor(knots, dtype=dtype)
    return t + -1 * (torch.cos(torch.pi / 2 * t) - 1 + t)


def cfm_sample(cond, his, y0, sde_rnd, sd, c, cfg, sigma=0.0, temperature=0.0, trace: dict | None = None):
    """CFM.sample with forward_with_cfg (2.0; the Preview's is the same without the SDE term).
    `trace` collects each sub-step's state x, time t and the two velocities."""
    t = time_grid(c["steps"], y0.dtype)
    args = torch.tensor([cfg, sigma, temperature], dtype=y0.dtype)
    for step in range(c["steps"]):
        dt = t[step + 1] - t[step]
        out = dit(torch.cat([y0, y0]), t[step].repeat(2 * y0.shape[0]), torch.cat([cond, torch.zeros_like(cond)]),
                  torch.cat([his, his]), sd, c)[:, -y0.shape[1]:]
        pred, null = out.chunk(2, dim=0)
        if trace is not None:
            for key, value in (("x", y0[0]), ("t", t[step]), ("pred_cond", pred[0]), ("pred_uncond", null[0])):
                trace.setdefault(key, []).append(value)
        y0 = y0 + (pred + (pred - null) * args[0]) * dt
        if sde_rnd is not None:
            y0 = y0 + args[1] * (args[2] ** 0.5) * (dt.abs() ** 0.5) * sde_rnd[step]
    return y0


def speaker_vectors(spk_192: torch.Tensor | None, sd: dict, c: dict, zero: bool = False) -> list[torch.Tensor]:
    """register_prompt_wav: spk_head(CAM++ vector) per prompt wav; use_zero_spk_emb: one zero LLM vector."""
    if zero:
        return [torch.zeros(c["llm"]["hidden_size"])]
    return [] if spk_192 is None else [F.linear(se, sd["spk_head.weight"], sd["spk_head.bias"]) for se in spk_192]


def prompt_embeddings(ids: list[int], sd: dict, c: dict, vision_start: int | None = None, audio: int | None = None,
                      speakers: list[torch.Tensor] = (), prompt_lat: torch.Tensor | None = None) -> torch.Tensor:
    """omni_audio_generation_func / register_prompt_wav: token embeddings with speaker vector i after the
    i-th <|vision_start|> and the prompt patches' aggregator outputs after the first <audio> (2.0); the
    Preview appends the aggregator outputs after its ids. -> [1, L, H]."""
    x = sd["model.embed_tokens.weight"][torch.tensor([ids])].clone()
    emb = None
    if prompt_lat is not None:
        p = c["patch_size"]
        emb = aggregator(prompt_lat.reshape(-1, p, prompt_lat.shape[-1]), sd, c).reshape(1, -1, x.shape[-1])
    if c["release"] == "preview":
        return x if emb is None else torch.cat([x, emb], dim=1)
    where = [i for i, t in enumerate(ids) if t == vision_start]
    for i, se in enumerate(speakers):
        x[0, where[i] + 1] = se
    if emb is not None:
        a = ids.index(audio)
        x[0, a + 1:a + 1 + emb.shape[1]] = emb[0]
    return x


def generate(embeds, prompt_lat, sd, c, generator, cfg=2.0, sigma=0.25, temperature=0.0, min_new_token=10,
             max_patches=MAX_STEPS, trace: dict | None = None):
    """BailingTalker2.generate (2.0) / the Preview's: list of (patch [1, patch, 64], stop prob, is_last),
    cut after `max_patches` (a test bound, not upstream's). `trace` collects per step: his, h, y0,
    next, stop logits, the cache position of later steps, and the CFM sub-steps ("cfm")."""
    trace = {} if trace is None else trace
    p, hist = c["patch_size"], c["history"]
    preview = c["release"] == "preview"
    if preview:
        cfg = c["cfg_strength"]
        his = prompt_lat[:, -p:] if prompt_lat is not None else torch.zeros(1, p, LATENT_DIM)
    else:
        his = torch.zeros(1, hist, LATENT_DIM)
        if prompt_lat is not None:
            start = hist - prompt_lat.shape[1]
            if start < 0:
                his[:] = prompt_lat[:, -start:]
            else:
                his[:, start:] = prompt_lat
    out, seq, step = [], embeds, 0
    while step < MAX_STEPS and step < MAX_CACHE_LEN - embeds.shape[1] and len(out) < max_patches:
        if step:
            trace.setdefault("cache_position", []).append(seq.shape[1] - 1)
        h = qwen2_forward(seq, sd, "model.", c["llm"])[:, -1:]
        sub = {}
        if preview:
            y0 = torch.randn(his.shape, generator=generator)
            gen = cfm_sample(h, his, y0, None, sd, c, cfg, trace=sub)
        else:
            y0 = torch.randn((1, p, LATENT_DIM), generator=generator)
            sde = torch.randn((c["steps"], 1, p, LATENT_DIM), generator=generator)
            trace.setdefault("sde", []).append(sde[:, 0])
            gen = cfm_sample(h, his, y0, sde, sd, c, cfg, sigma, temperature, trace=sub)
        nxt = aggregator(gen, sd, c)
        logits = F.linear(h[:, -1], sd["stop_head.weight"], sd["stop_head.bias"])
        stop = logits.softmax(dim=-1)
        for key, value in (("his", his[0]), ("h", h[0, 0]), ("y0", y0[0]), ("next", nxt[0, 0]), ("logits", logits[0]),
                           ("cfm", sub)):
            trace.setdefault(key, []).append(value)
        his = gen if hist == p else torch.cat([his[:, p - hist:], gen], dim=1)
        if step > min_new_token and stop[0, 1] > 0.5:
            out.append((gen, float(stop[0, 1]), True))
            break
        out.append((gen, float(stop[0, 1]), False))
        step += 1
        seq = torch.cat([seq, nxt], dim=1)
    return out
