"""What neox does with each gpt-neox config key that is not one of its own fields.

Four kinds of key, so nothing in a gpt-neox config is silently dropped:
  * ALIASES      another gpt-neox/DeepSpeed name for one of our fields;
  * SECTIONS     DeepSpeed's nested dicts (optimizer, zero_optimization, fp16, bf16), flattened;
  * HINTS        accepted and ignored: performance hints, logging, launcher and generation settings
                 that do not change what is trained;
  * UNSUPPORTED  gpt-neox features neox does not implement: accepted only at their neutral value,
                 otherwise a ConfigError says what neox supports instead.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

# gpt-neox / DeepSpeed name -> neox field.
ALIASES: dict[str, str] = {
    "gradient_clipping": "clip_grad",
    "save_interval": "checkpoint_factor",
    "batch_size": "train_micro_batch_size_per_gpu",
    "min_scale": "min_loss_scale",
    "peak_theoretical_tflops": "peak_flops",  # value * 1e12
}

_FUSION = "kernel-fusion or speed hint (same math)"
_LOG = "logging / profiling only"
_LAUNCH = "launcher or runtime setting (neox takes it from the launcher environment)"
_GEN = "text generation / evaluation setting (neox tools take it as a command-line flag)"
_DS = "DeepSpeed engine tuning with no effect on the result"
_OFF = "only read by a gpt-neox feature neox rejects when enabled"

HINTS: dict[str, str] = {
    **dict.fromkeys((
        "scaled_upper_triang_masked_softmax_fusion", "scaled_masked_softmax_fusion", "bias_gelu_fusion",
        "bias_dropout_fusion", "rope_fusion", "layernorm_fusion", "rmsnorm_fusion", "use_flashattn_swiglu",
        "fused_kernels_build_path", "partition_activations", "synchronize_each_layer",
        "contiguous_checkpointing", "checkpoint_in_cpu", "deepspeed_activation_checkpointing",
        "profile_backward", "use_cpu_initialization", "attention_softmax_in_fp32",
        "apply_query_key_layer_scaling", "fp16_lm_cross_entropy", "fp32_allreduce", "prescale_gradients",
        "gradient_predivide_factor", "rotary_save_freqs_buffer", "use_shared_fs", "short_seq_prob",
        "mamba_selective_scan_fusion", "mamba_causal_conv_fusion", "mamba_inner_func_fusion",
        "output_layer_parallelism", "activation_checkpointing", "auto_cast",
    ), _FUSION),
    **dict.fromkeys((
        "zero_reduce_scatter", "zero_contiguous_gradients", "allgather_partitions", "overlap_comm",
        "reduce_scatter", "contiguous_gradients", "round_robin_gradients", "load_from_fp32_weights",
        "elastic_checkpoint", "communication_data_type", "dynamic_loss_scale", "data_types",
        "checkpoint", "override_lr_scheduler", "use_checkpoint_lr_scheduler",
    ), _DS),
    **dict.fromkeys((
        "wall_clock_breakdown", "steps_per_print", "git_hash", "log_grad_pct_zeros", "log_optimizer_states",
        "log_gradient_noise_scale", "gradient_noise_scale_n_batches", "gradient_noise_scale_cpu_offload",
        "memory_profiling", "memory_profiling_path", "profile", "profile_step_start", "profile_step_stop",
        "dump_state", "flops_profiler", "comms_logger", "csv_monitor", "tensorboard", "wandb",
        "wandb_team", "wandb_host", "wandb_init_all_ranks", "use_comet", "comet_workspace",
        "comet_project", "comet_experiment_name", "comet_tags", "comet_others", "comet_experiment",
        "char_level_ppl", "checkpoint_validation_with_forward_pass",
    ), _LOG),
    **dict.fromkeys((
        "distributed_backend", "hostfile", "include", "exclude", "num_nodes", "num_gpus", "master_port",
        "master_addr", "launcher", "force_multi", "no_ssh_check", "comment", "account", "deepspeed",
        "deepspeed_mpi", "deepspeed_slurm", "deepscale", "deepscale_config", "user_script", "local_rank",
        "rank", "world_size", "global_num_gpus", "iteration", "do_train", "do_valid", "do_test",
        "is_pipe_parallel", "lazy_mpu_init", "onnx_safe", "adlr_autoresume", "adlr_autoresume_interval",
        "autotuning", "autotuning_run", "config_files", "padded_vocab_size", "deepspeed_extra_args",
    ), _LAUNCH),
    **dict.fromkeys((
        "text_gen_type", "precompute_model_name", "temperature", "top_p", "top_k", "return_logits",
        "maximum_tokens", "prompt_end", "sample_input_file", "sample_output_file", "num_samples",
        "recompute", "eval_results_prefix", "eval_tasks",
    ), _GEN),
    **dict.fromkeys((
        "moe_expert_interval", "moe_top_k", "moe_router_type", "moe_lbl_in_fp32", "moe_jitter_eps",
        "moe_aux_loss_coeff", "moe_type", "moe_use_residual", "rpe_num_buckets", "rpe_max_distance",
        "rms_norm_epsilon", "scalenorm_epsilon", "gmlp_attn_dim", "param_sharing_style",
        "mamba_selective_fp32_params", "mamba_use_bias_in_conv", "mamba_use_bias_in_linears",
        "te_fp8_format", "te_fp8_wgrad", "te_fp8_amax_history_len", "te_fp8_amax_compute_algo",
        "te_fp8_margin", "dpo_fp32", "dpo_reference_free", "dpo_beta", "kto_fp32", "kto_desirable_weight",
        "kto_undesirable_weight", "kto_beta", "fp32_reinforce", "kl_impl", "kl_div_beta",
        "reinforce_leave_one_out", "mup_init_scale", "mup_attn_temp", "mup_output_temp",
        "mup_embedding_mult", "mup_rp_embedding_mult", "mup_width_scale", "coord_check",
        "save_base_shapes", "base_shapes_file", "weighted_sampler_alpha", "curriculum_seqlen",
    ), _OFF),
}


def _falsy_or_disabled(v: Any) -> bool:
    return not v or (isinstance(v, dict) and not v.get("enabled", False))


def attention_types(v: Any) -> set[str] | None:
    """Layer types named by attention_config: [[["flash"], 6]] (compact) or ["global", ...] (expanded);
    None when the value has neither form."""
    types: set[str] = set()
    for item in v or []:
        if isinstance(item, str):
            types.add(item)
        elif isinstance(item, (list, tuple)) and item and isinstance(item[0], (list, tuple)):
            types.update(item[0])
        else:
            return None
    return types


def _attention_types_ok(v: Any) -> bool:
    types = attention_types(v)
    return types is not None and types <= {"global", "flash"}


_DENSE = "neox supports dense transformers only"
# key -> (is the value neutral?, what neox supports instead)
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "moe_num_experts": (lambda v: v in (None, 1), f"mixture of experts: {_DENSE} (moe_num_experts: 1)"),
    "attention_config": (_attention_types_ok,
                         "sparse / local / mamba / rwkv attention layers: neox supports 'global' and "
                         "'flash' (same math) in attention_config; use model_type: rwkv for RWKV"),
    "sparsity_config": (_falsy_or_disabled, "sparse attention: neox supports dense (global/flash) attention"),
    "sparse_attention": (_falsy_or_disabled, "DeepSpeed sparse attention: neox supports dense attention"),
    "gpt_j_tied": (lambda v: not v,
                   "gpt_j_tied: neox supports gpt_j_residual with two norms (gpt_j_tied: false)"),
    "use_mup": (lambda v: not v, "muP: neox supports standard parametrisation (use_mup: false)"),
    "curriculum_learning": (_falsy_or_disabled, "curriculum learning: neox trains at fixed seq_length"),
    "num_kv_heads": (lambda v: v is None, "grouped-query attention: neox supports multi-head attention "
                     "(leave num_kv_heads unset)"),
    "sliding_window_width": (lambda v: v is None,
                             "sliding-window attention: neox supports full causal attention"),
    "use_qk_layernorm": (lambda v: not v, "QK layernorm: not implemented (use_qk_layernorm: false)"),
    "use_bias_in_norms": (lambda v: v in (None, True), "bias-free norms: neox layers always have biases"),
    "use_bias_in_attn_linear": (lambda v: v in (None, True), "bias-free attention: neox layers have biases"),
    "use_bias_in_mlp": (lambda v: v in (None, True), "bias-free MLP: neox layers always have biases"),
    "mlp_multiple_of": (lambda v: v in (None, 1), "mlp_multiple_of: set intermediate_size directly"),
    "expansion_factor": (lambda v: v is None, "expansion_factor: set intermediate_size directly"),
    "num_unique_layers": (lambda v: v is None, "layer sharing: every neox layer has its own weights"),
    "soft_prompt_tuning": (_falsy_or_disabled, "soft prompt tuning is not implemented"),
    "train_impl": (lambda v: v in (None, "normal"), "train_impl dpo/rm/kto/reinforce: use neox's RLHF "
                   "stages (configs/rlhf) instead; train_impl: normal is supported"),
    "dataset_impl": (lambda v: v in (None, "gpt2"), "dataset_impl: only gpt2 (packed LM data); pairwise "
                     "and online data come with neox's RLHF stages"),
    "pack_impl": (lambda v: v in (None, "packed"), "pack_impl: only 'packed' documents are supported"),
    "allow_chopped": (lambda v: v in (None, True), "allow_chopped: false is not implemented"),
    "z_loss": (lambda v: not v, "z-loss is not implemented (z_loss: 0)"),
    "train_epochs": (lambda v: v is None, "train_epochs: set train_iters instead"),
    "checkpoint_scale": (lambda v: v in (None, "linear"), "checkpoint_scale: only 'linear' "
                         "(every checkpoint_factor iterations, plus extra_save_iters)"),
    "weight_by_num_documents": (lambda v: not v, "weight_by_num_documents: give train_data_weights instead"),
    "use_bnb_optimizer": (lambda v: not v, "bitsandbytes optimizers: neox supports Adam, AdamW, SGD, Lion"),
    "scheduler": (lambda v: not v, "DeepSpeed schedulers: use lr_decay_style (constant, linear, cosine, "
                  "inverse_sqrt) with warmup and min_lr"),
    "sparse_gradients": (lambda v: not v, "sparse gradients are not implemented"),
    "amp": (_falsy_or_disabled, "apex AMP: use fp16 or bf16 sections (or precision)"),
    "opt_pos_emb_offset": (lambda v: not v, "OPT position offsets: neox supports rotary positions"),
    "cpu_offload": (lambda v: not v, "ZeRO CPU offload: neox supports ZeRO stage 0/1 on device"),
    "offload_optimizer": (_falsy_or_disabled, "ZeRO optimizer offload is not implemented"),
    "offload_param": (_falsy_or_disabled, "ZeRO parameter offload is not implemented"),
    "compression_training": (_falsy_or_disabled, "DeepSpeed compression is not implemented"),
    "data_efficiency": (_falsy_or_disabled, "DeepSpeed data efficiency is not implemented"),
    "elasticity": (_falsy_or_disabled, "DeepSpeed elasticity is not implemented"),
    "s3_path": (lambda v: v is None, "S3 checkpoint upload: copy the `save` directory yourself"),
    "s3_chunk_size": (lambda v: True, ""),
    "serve_model_weights": (lambda v: not v, "weight serving is not implemented"),
    "weight_server_port": (lambda v: True, ""),
    "online_dataserver_ips": (lambda v: True, ""),
    "online_dataserver_ports": (lambda v: True, ""),
    "dim_att": (lambda v: v is None, "RWKV dim_att: neox's RWKV-4 uses hidden_size for time mixing"),
    "head_size": (lambda v: v is None, "RWKV head_size: neox's RWKV-4 has no heads"),
    "ffn_dim": (lambda v: v is None, "RWKV ffn_dim: set intermediate_size instead"),
    **{k: (lambda v: not v, f"Transformer Engine ({k}) is not implemented")
       for k in ("te_columnparallel", "te_rowparallel", "te_layernorm_mlp", "te_mha", "te_fp8_mha")},
    **{f"{split}_{kind}_data_paths": (lambda v: v is None, "label/reward/pairwise data paths: use neox's "
                                      "RLHF stages and their datasets")
       for split in ("train", "valid", "test") for kind in ("label", "reward")},
    **{f"{pn}_{split}{lab}_data_paths": (lambda v: v is None, "pairwise (pos/neg) data paths: use neox's "
                                         "DPO / reward-model stages")
       for pn in ("pos", "neg") for split in ("train", "valid", "test") for lab in ("", "_label")},
}


def check_unsupported(key: str, value: Any, origin: str) -> None:
    """ConfigError if a gpt-neox feature neox does not implement is switched on."""
    ok, what = UNSUPPORTED[key]
    if not ok(value):
        raise ConfigError(f"{origin}: `{key}: {value!r}` is a gpt-neox feature neox does not support: {what}")


# ---- DeepSpeed sections -----------------------------------------------------------------------------

_OPT_TYPES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "lion": "Lion"}
_PRECISIONS = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "half": "fp16",
               "bf16": "bf16", "bfloat16": "bf16"}
_PARTITION = {"uniform": "uniform", "parameters": "parameters",
              "type:transformer|mlp": "uniform", "type:transformer": "uniform"}


def canonical_value(key: str, value: Any) -> Any:
    """Spellings gpt-neox accepts -> neox's canonical value (unknown spellings pass through to validate)."""
    if key == "optimizer_type" and isinstance(value, str):
        return _OPT_TYPES.get(value.lower(), value)
    if key == "precision" and isinstance(value, str):
        return _PRECISIONS.get(value.lower(), value)
    if key == "pipe_partition_method" and isinstance(value, str):
        return _PARTITION.get(value.lower(), value)
    return value


_LOSS_SCALE_KEYS = ("loss_scale", "loss_scale_window", "initial_scale_power", "hysteresis", "min_loss_scale")


def _norm(key: Any) -> str:
    return str(key).replace("-", "_")


def _section(name: str, value: Any, origin: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{origin}: `{name}` must be a mapping, got {value!r}")
    return {_norm(k): v for k, v in value.items()}


def flatten_sections(raw: dict, origin: str) -> dict:
    """Normalised top-level dict -> flat neox/gpt-neox keys. One file at a time, so that conflicting
    precision settings in a file are caught and a later file's sections override an earlier one's."""
    flat = {k: v for k, v in raw.items() if k not in ("optimizer", "zero_optimization", "fp16", "bf16")}

    opt = _section("optimizer", raw.get("optimizer"), origin)
    for k, v in opt.items():
        if k == "type":
            flat["optimizer_type"] = v
        elif k == "params":
            for pk, pv in _section("optimizer.params", v, origin).items():
                if pk not in ("lr", "betas", "eps", "weight_decay", "momentum"):
                    raise ConfigError(
                        f"{origin}: unknown key `optimizer.params.{pk}`; neox reads lr, betas, eps, "
                        f"weight_decay, momentum"
                    )
                if pk in flat and flat[pk] != pv:
                    raise ConfigError(
                        f"{origin}: `{pk}` is set both at top level ({flat[pk]!r}) and in optimizer.params "
                        f"({pv!r}); keep one"
                    )
                flat[pk] = pv
        else:
            raise ConfigError(f"{origin}: unknown key `optimizer.{k}`; expected `type` and `params`")

    zero = _section("zero_optimization", raw.get("zero_optimization"), origin)
    for k, v in zero.items():
        if k == "stage":
            flat["zero_stage"] = v
        elif k in ("reduce_bucket_size", "allgather_bucket_size"):
            flat[f"zero_{k}"] = v
        elif k in UNSUPPORTED:
            check_unsupported(k, v, origin)
        elif k not in HINTS:
            raise ConfigError(
                f"{origin}: unknown key `zero_optimization.{k}`; neox reads stage, reduce_bucket_size, "
                f"allgather_bucket_size and accepts DeepSpeed's tuning flags (overlap_comm, ...)"
            )

    sources: dict[str, str] = {}  # precision -> which setting asked for it
    if "precision" in raw:
        sources[canonical_value("precision", raw["precision"])] = "precision"
    for name in ("fp16", "bf16"):
        sec = _section(name, raw.get(name), origin)
        if not sec:
            continue
        enabled = sec.get("enabled", sec.get(name, False))
        for k, v in sec.items():
            if k in ("enabled", name, "type"):
                continue
            if k in _LOSS_SCALE_KEYS:
                if name == "fp16":
                    flat[k] = v
                # in a bf16 section (gpt-neox's RWKV config has them) loss scaling means nothing
            elif k in HINTS:
                continue
            else:
                raise ConfigError(
                    f"{origin}: unknown key `{name}.{k}`; neox reads enabled"
                    + (", loss_scale, loss_scale_window, initial_scale_power, hysteresis, min_loss_scale"
                       if name == "fp16" else "")
                )
        if enabled:
            want = "bf16" if name == "bf16" or str(sec.get("type", "")).lower() == "bfloat16" else "fp16"
            sources.setdefault(want, f"{name}.enabled")
        elif "precision" not in raw:
            sources.setdefault("fp32", f"{name}.enabled: false")
    if len(sources) > 1 and "fp32" in sources and any(s.endswith(": false") for s in sources.values()):
        sources = {p: s for p, s in sources.items() if p != "fp32" or not s.endswith(": false")}
    if len(sources) > 1:
        detail = ", ".join(f"{s} -> {p}" for p, s in sources.items())
        raise ConfigError(
            f"{origin}: conflicting precision settings ({detail}); enable only one of fp16/bf16"
        )
    if sources:
        flat["precision"] = next(iter(sources))
    return flat


def resolve_aliases(flat: dict, origin: str) -> dict:
    """Rename gpt-neox/DeepSpeed aliases to neox fields (converting units where they differ)."""
    out = dict(flat)
    for alias, target in ALIASES.items():
        if alias not in out:
            continue
        value = out.pop(alias)
        if alias == "peak_theoretical_tflops" and value is not None:
            value = float(value) * 1e12
        if target in out and out[target] != value:
            raise ConfigError(
                f"{origin}: `{alias}` ({value!r}) and `{target}` ({out[target]!r}) name the same setting "
                f"with different values; keep one"
            )
        out[target] = value
    return out
