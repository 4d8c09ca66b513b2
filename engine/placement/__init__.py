"""Fitting a model on this machine's hardware: the placement planner (`planner`), the automatic
plan for the local GPUs and host (`auto`), the runtime that executes a plan for the routed experts
(`expert_runtime`: experts across GPUs, cold experts on the CPU, hot-expert cache) and quantised
expert storage (`quant`)."""
