"""The option names each tool accepts, by the class that declares them: an input key not
listed here is unknown to that tool (an error with "did you mean"), one listed here but not
mapped by the tool's table gets the reason of its group.

Generated from the tools' own argument classes: llamafactory 0.9.5 (hparams/*.py), axolotl
0.19.0 (utils/schemas/*.py), transformers 5.23.0 (Seq2SeqTrainingArguments) and trl 1.16.0
(ScriptArguments, ModelConfig, DatasetMixtureConfig and each trainer's config, own fields
only). tests/test_import.py checks the transformers and trl lists against the installed
packages.
"""

from __future__ import annotations


def names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# transformers.Seq2SeqTrainingArguments (LLaMA-Factory and TRL configs take every one)
TRANSFORMERS = names("""
output_dir per_device_train_batch_size num_train_epochs max_steps learning_rate
lr_scheduler_type lr_scheduler_kwargs warmup_steps optim optim_args weight_decay adam_beta1
adam_beta2 adam_epsilon optim_target_modules gradient_accumulation_steps
average_tokens_across_devices max_grad_norm label_smoothing_factor bf16 fp16 bf16_full_eval
fp16_full_eval tf32 activation_checkpointing activation_checkpointing_kwargs
gradient_checkpointing gradient_checkpointing_kwargs torch_compile torch_compile_backend
torch_compile_mode use_liger_kernel liger_kernel_config use_cache neftune_noise_alpha
torch_empty_cache_steps auto_find_batch_size logging_strategy logging_steps logging_first_step
log_on_each_node logging_nan_inf_filter include_num_input_tokens_seen log_level
log_level_replica disable_tqdm report_to run_name project trackio_space_id trackio_bucket_id
trackio_static_space_id eval_strategy eval_steps eval_delay per_device_eval_batch_size
prediction_loss_only eval_on_start eval_do_concat_batches eval_use_gather_object
eval_accumulation_steps include_for_metrics batch_eval_metrics save_only_model save_strategy
save_steps save_on_each_node save_total_limit enable_jit_checkpoint push_to_hub hub_token
hub_private_repo hub_model_id hub_strategy hub_always_push hub_revision load_best_model_at_end
metric_for_best_model greater_is_better ignore_data_skip restore_callback_states_from_checkpoint
full_determinism seed data_seed use_cpu accelerator_config parallelism_config
dataloader_drop_last dataloader_num_workers dataloader_pin_memory dataloader_persistent_workers
dataloader_prefetch_factor dataloader_multiprocessing_context dataloader_in_order
remove_unused_columns label_names train_sampling_strategy length_column_name
ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers ddp_static_graph ddp_backend
ddp_timeout fsdp fsdp_config deepspeed debug skip_memory_metrics do_train do_eval do_predict
resume_from_checkpoint local_rank sortish_sampler predict_with_generate generation_max_length
generation_num_beams generation_config
""")

LLAMAFACTORY = {
    "DataArguments": """
    template dataset eval_dataset dataset_dir media_dir cutoff_len train_on_prompt
    mask_history streaming buffer_size mix_strategy interleave_probs overwrite_cache
    preprocessing_batch_size preprocessing_num_workers max_samples eval_num_beams
    ignore_pad_token_for_loss val_size eval_on_each_dataset packing neat_packing tool_format
    default_system enable_thinking preserve_thinking tokenized_path data_shared_file_system
    """,
    "FreezeArguments": """
    freeze_trainable_layers freeze_trainable_modules freeze_extra_modules
    """,
    "LoraArguments": """
    additional_target lora_alpha lora_dropout lora_rank lora_target loraplus_lr_ratio
    loraplus_lr_embedding use_rslora use_dora pissa_init pissa_iter pissa_convert
    create_new_adapter
    """,
    "OFTArguments": """
    additional_target module_dropout oft_rank oft_block_size oft_target create_new_adapter
    """,
    "RLHFArguments": """
    pref_beta pref_ftx pref_bco_weight pref_loss dpo_label_smoothing kto_chosen_weight
    kto_rejected_weight simpo_gamma ppo_buffer_size ppo_epochs ppo_score_norm ppo_target
    ppo_whiten_rewards ref_model ref_model_adapters ref_model_quantization_bit reward_model
    reward_model_adapters reward_model_quantization_bit reward_model_type ld_alpha
    """,
    "GaloreArguments": """
    use_galore galore_target galore_rank galore_update_interval galore_scale
    galore_proj_type galore_layerwise
    """,
    "ApolloArguments": """
    use_apollo apollo_target apollo_rank apollo_update_interval apollo_scale apollo_proj
    apollo_proj_type apollo_scale_type apollo_layerwise apollo_scale_front
    """,
    "BAdamArgument": """
    use_badam badam_mode badam_start_block badam_switch_mode badam_switch_interval
    badam_update_ratio badam_mask_mode badam_verbose
    """,
    "SwanLabArguments": """
    use_swanlab swanlab_project swanlab_workspace swanlab_run_name swanlab_mode
    swanlab_api_key swanlab_logdir swanlab_lark_webhook_url swanlab_lark_secret
    """,
    "FinetuningArguments": """
    pure_bf16 stage finetuning_type use_llama_pro use_adam_mini use_mca use_hyper_parallel
    hyper_parallel_args use_muon use_dft_loss use_asft_loss asft_alpha use_eaft_loss
    eaft_alpha freeze_vision_tower freeze_multi_modal_projector freeze_language_model
    compute_accuracy disable_shuffling early_stopping_steps plot_loss
    include_effective_tokens_per_second
    """,
    "BaseModelArguments": """
    model_name_or_path adapter_name_or_path adapter_folder cache_dir use_fast_tokenizer
    resize_vocab split_special_tokens add_tokens add_special_tokens
    new_special_tokens_config init_special_tokens model_revision low_cpu_mem_usage
    rope_scaling flash_attn shift_attn mixture_of_depths use_unsloth use_unsloth_gc
    enable_liger_kernel moe_aux_loss_coef disable_gradient_checkpointing use_reentrant_gc
    upcast_layernorm upcast_lmhead_output train_from_scratch infer_backend offload_folder
    use_kv_cache use_v1_kernels infer_dtype hf_hub_token ms_hub_token om_hub_token
    print_param_status trust_remote_code
    """,
    "QuantizationArguments": """
    quantization_method quantization_bit quantization_type double_quantization
    quantization_device_map
    """,
    "ProcessorArguments": """
    image_max_pixels image_min_pixels image_do_pan_and_scan crop_to_patches video_max_pixels
    video_min_pixels video_fps video_maxlen use_audio_in_video audio_sampling_rate
    """,
    "ExportArguments": """
    export_dir export_size export_device export_quantization_bit export_quantization_dataset
    export_quantization_nsamples export_quantization_maxlen export_legacy_format
    export_hub_model_id
    """,
    "VllmArguments": """
    vllm_maxlen vllm_gpu_util vllm_enforce_eager vllm_max_lora_rank vllm_config
    """,
    "SGLangArguments": """
    sglang_maxlen sglang_mem_fraction sglang_tp_size sglang_config sglang_lora_backend
    """,
    "KTransformersArguments": """
    use_kt kt_weight_path kt_expert_checkpoint_path kt_use_lora_experts kt_lora_expert_num
    kt_lora_expert_intermediate_size
    """,
    "ModelArguments": """
    compute_dtype device_map model_max_length block_diag_attn
    """,
    "RayArguments": """
    ray_num_workers ray_init_kwargs master_addr master_port
    """,
    "ProfilerArguments": """
    enable_torch_profiler profiler_output_dir profiler_wait_steps profiler_warmup_steps
    profiler_active_steps profiler_repeat profiler_record_shapes profiler_profile_memory
    profiler_with_stack profile_modules
    """,
    "Fp8Arguments": """
    fp8 fp8_backend fp8_enable_fsdp_float8_all_gather
    """,
    "TrainingArguments": """
    overwrite_output_dir
    """,
    "GeneratingArguments": """
    do_sample temperature top_p top_k num_beams max_length max_new_tokens repetition_penalty
    length_penalty skip_special_tokens
    """,
}

AXOLOTL = {
    "ModelInputConfig": """
    base_model base_model_config cls_model_config tokenizer_config tokenizer_use_fast
    tokenizer_legacy tokenizer_use_mistral_common tokenizer_type processor_type
    processor_kwargs tokenizer_save_jinja_files trust_remote_code
    experimental_skip_move_to_device use_kernels model_quantization_config
    model_quantization_config_kwargs use_onebitllms
    """,
    "ModelOutputConfig": """
    output_dir hub_model_id hub_strategy hub_revision save_safetensors
    """,
    "LoraConfig": """
    load_in_8bit load_in_4bit adapter lora_model_dir lora_r lora_alpha lora_fan_in_fan_out
    lora_target_modules lora_target_parameters lora_target_linear lora_modules_to_save
    lora_rank_pattern lora_alpha_pattern lora_dropout peft_layers_to_transform
    peft_layers_pattern peft peft_use_dora peft_use_rslora peft_layer_replication
    peft_init_lora_weights peft_trainable_token_indices peft_ensure_weight_tying
    peft_autocast_adapter_dtype qlora_sharded_model_loading lora_on_cpu gptq
    bnb_config_kwargs loraplus_lr_ratio loraplus_lr_embedding merge_lora merge_method
    """,
    "ReLoRAConfig": """
    relora relora_prune_ratio relora_prune_method relora_cpu_offload
    """,
    "JaggedLRConfig": """
    jagged_restart_steps jagged_restart_warmup_steps jagged_restart_anneal_steps
    """,
    "HyperparametersConfig": """
    gradient_accumulation_steps micro_batch_size batch_size eval_batch_size
    auto_find_batch_size train_on_inputs group_by_length learning_rate embedding_lr
    embedding_lr_scale weight_decay optimizer optim_args optim_target_modules
    torchdistx_path lr_scheduler lr_scheduler_kwargs lr_quadratic_warmup cosine_min_lr_ratio
    cosine_constant_lr_ratio lr_div_factor lr_groups adam_epsilon adam_epsilon2 adam_beta1
    adam_beta2 adam_beta3 dion_lr dion_momentum dion_rank_fraction dion_rank_multiple_of
    qgalore_rank qgalore_update_proj_gap qgalore_scale qgalore_proj_type qgalore_proj_quant
    qgalore_proj_bits qgalore_proj_group_size qgalore_cos_threshold qgalore_gamma_proj
    qgalore_queue_size max_grad_norm num_epochs
    """,
    "WandbConfig": """
    use_wandb wandb_name wandb_run_id wandb_mode wandb_project wandb_entity wandb_watch
    wandb_log_model
    """,
    "MLFlowConfig": """
    use_mlflow mlflow_tracking_uri mlflow_experiment_name mlflow_run_name
    hf_mlflow_log_artifacts
    """,
    "CometConfig": """
    use_comet comet_api_key comet_workspace comet_project_name comet_experiment_key
    comet_mode comet_online comet_experiment_config
    """,
    "TrackioConfig": """
    use_trackio trackio_project_name trackio_run_name trackio_space_id
    """,
    "OpenTelemetryConfig": """
    use_otel_metrics otel_metrics_host otel_metrics_port
    """,
    "LISAConfig": """
    lisa_n_layers lisa_step_interval lisa_layers_attribute
    """,
    "GradioConfig": """
    gradio_title gradio_share gradio_server_name gradio_server_port gradio_max_new_tokens
    gradio_temperature
    """,
    "RayConfig": """
    use_ray ray_run_name ray_num_workers resources_per_worker
    """,
    "MultiModalConfig": """
    image_size image_resize_algorithm role_boundaries
    """,
    "RemappedParameters": """
    model_config model_kwargs model_type model_revision
    """,
    "DeprecatedParameters": """
    max_packed_sequence_len rope_scaling noisy_embedding_alpha dpo_beta evaluation_strategy
    eval_table_size eval_max_new_tokens dpo_use_logits_to_keep dpo_generate_during_eval
    dpo_norm_loss rpo_alpha s2_attention flash_attn_rms_norm
    """,
    "AxolotlInputConfig": """
    strict resume_from_checkpoint auto_resume_from_checkpoints
    resize_token_embeddings_to_32x mean_resizing_embeddings shrink_embeddings
    embeddings_skip_upcast reinit_weights trainer_cls rl trl vllm ebft qat quantization
    reward_model dynamic_checkpoint process_reward_model center_rewards_coefficient
    num_labels dpo_use_weighting dpo_label_smoothing precompute_ref_log_probs
    dpo_use_liger_kernel dpo_padding_free dpo_loss_type dpo_loss_weights datasets
    test_datasets shuffle_merged_datasets shuffle_before_merging_datasets
    dataset_prepared_path dataset_shard_num dataset_shard_idx skip_prepare_dataset
    num_dataset_shards_to_save pretraining_dataset dataset_processes dataset_num_proc
    dataset_exact_deduplication dataset_keep_in_memory dataloader_pin_memory
    dataloader_num_workers dataloader_prefetch_factor dataloader_drop_last
    accelerator_config remove_unused_columns push_dataset_to_hub hf_use_auth_token device
    device_map world_size local_rank ddp seed ddp_timeout ddp_bucket_cap_mb
    ddp_broadcast_buffers ddp_find_unused_parameters do_causal_lm_eval
    eval_causal_lm_metrics do_bench_eval bench_dataset bench_split metric_for_best_model
    greater_is_better loss_watchdog_threshold loss_watchdog_patience gc_steps
    torch_empty_cache_steps gc_collect_steps bf16 fp16 fp8 fp8_config
    fp8_enable_fsdp_float8_all_gather bfloat16 float16 tf32 float32 gradient_checkpointing
    gradient_checkpointing_kwargs selective_checkpointing activation_offloading
    layer_offloading freeze_mm_modules unfrozen_parameters sequence_len
    excess_length_strategy eval_sequence_len min_sample_len max_prompt_len sample_packing
    sample_packing_group_size sample_packing_bin_size sample_packing_sequentially
    sample_packing_mp_start_method eval_sample_packing pad_to_sequence_len
    pad_to_multiple_of curriculum_sampling multipack_real_batches batch_flattening use_pose
    pose_split_on_token_ids pose_max_context_len pose_num_chunks
    pretrain_multipack_buffer_size pretrain_multipack_attn pretraining_sample_concatenation
    streaming streaming_multipack_buffer_size xformers_attention sdp_attention
    flex_attention flex_attn_compile_kwargs flash_attention flash_attn_cross_entropy
    flash_attn_fuse_mlp flash_optimum sage_attention eager_attention attn_implementation
    gemma4_hybrid_attn_impl large_head_attention flash_attn_d512 sdpa_varlen
    fused_attn_kernel experts_implementation ple_cpu_offload quantize_moe_experts
    scaling_softmax scaling_softmax_factor scaling_softmax_bias lora_mlp_kernel
    lora_qkv_kernel lora_o_kernel lora_embedding_kernel chunked_cross_entropy
    chunked_cross_entropy_num_chunks use_eaft eaft_alpha eaft_k tiled_mlp
    tiled_mlp_num_shards tiled_mlp_use_original_mlp llama4_linearized_experts deepspeed
    deepcompile fsdp fsdp_config fsdp_version fp32_norms fp32_norm_classes
    fsdp_final_state_dict_type val_set_size dp_shard_size dp_replicate_size
    sequence_parallel_degree context_parallel_size heads_k_stride ring_attn_func
    tensor_parallel_size special_tokens tokens added_tokens_overrides torch_compile
    torch_compile_backend torch_compile_mode torch_compile_options max_steps warmup_steps
    warmup_ratio eval_steps evals_per_epoch eval_strategy save_steps saves_per_epoch
    save_strategy save_total_limit save_first_step logging_steps early_stopping_patience
    load_best_model_at_end save_only_model use_tensorboard profiler_steps
    profiler_steps_start include_tokens_per_second include_tkps neftune_noise_alpha
    orpo_alpha simpo_gamma cpo_alpha kto_desirable_weight kto_undesirable_weight rl_beta
    max_memory gpu_memory_limit low_cpu_mem_usage chat_template chat_template_jinja
    chat_template_kwargs eot_tokens default_system_message fix_untrained_tokens
    is_preprocess preprocess_iterable total_num_tokens total_supervised_tokens
    sample_packing_eff_est axolotl_config_path is_falcon_derived_model
    is_llama_derived_model is_mistral_derived_model is_qwen_derived_model plugins
    generate_samples num_generation_samples generation_max_new_tokens generation_temperature
    generation_top_p generation_top_k generation_prompt_ratio generation_do_sample
    """,
}

TRL = {
    "sft": """
    model_init_kwargs trust_remote_code router_aux_loss_coef chat_template_path
    dataset_text_field dataset_kwargs dataset_num_proc eos_token max_length truncation_mode
    shuffle_dataset packing packing_strategy padding_free pad_to_multiple_of eval_packing
    completion_only_loss assistant_only_loss loss_type activation_offloading pad_token
    """,
    "dpo": """
    model_init_kwargs trust_remote_code router_aux_loss_coef disable_dropout
    dataset_num_proc max_length truncation_mode padding_free pad_to_multiple_of
    precompute_ref_log_probs precompute_ref_batch_size loss_type loss_weights ld_alpha
    f_divergence_type f_alpha_divergence_coef label_smoothing beta use_weighting
    discopop_tau activation_offloading sync_ref_model ref_model_mixup_alpha
    ref_model_sync_steps pad_token
    """,
    "kto": """
    model_init_kwargs trust_remote_code router_aux_loss_coef disable_dropout
    dataset_num_proc max_length pad_to_multiple_of precompute_ref_log_probs
    precompute_ref_batch_size loss_type beta desirable_weight undesirable_weight
    activation_offloading sync_ref_model ref_model_mixup_alpha ref_model_sync_steps
    """,
    "reward": """
    model_init_kwargs trust_remote_code chat_template_path disable_dropout dataset_num_proc
    eos_token max_length pad_to_multiple_of center_rewards_coefficient activation_offloading
    pad_token
    """,
    "grpo": """
    model_init_kwargs trust_remote_code router_aux_loss_coef disable_dropout
    cast_lm_head_to_fp32 num_generations num_generations_eval max_completion_length
    ds3_gather_for_generation shuffle_dataset pad_to_multiple_of generation_batch_size
    steps_per_generation temperature top_p top_k min_p generation_kwargs
    chat_template_kwargs repetition_penalty cache_implementation use_vllm vllm_mode
    vllm_model_impl vllm_enable_sleep_mode vllm_structured_outputs_regex
    vllm_server_base_url vllm_server_host vllm_server_port vllm_server_timeout
    vllm_group_port vllm_gpu_memory_utilization vllm_max_model_length
    vllm_tensor_parallel_size beta num_iterations epsilon delta epsilon_high
    sapo_temperature_neg sapo_temperature_pos vespo_k_pos vespo_lambda_pos vespo_k_neg
    vespo_lambda_neg importance_sampling_level reward_weights multi_objective_aggregation
    scale_rewards loss_type mask_truncated_completions sync_ref_model ref_model_mixup_alpha
    ref_model_sync_steps top_entropy_quantile entropy_coef use_adaptive_entropy
    entropy_coef_min entropy_coef_max entropy_coef_delta entropy_target
    max_tool_calling_iterations vllm_importance_sampling_correction
    vllm_importance_sampling_mode vllm_importance_sampling_clip_max
    vllm_importance_sampling_clip_min off_policy_mask_threshold use_bias_correction_kl
    log_completions log_multimodal num_completions_to_print log_unique_prompts
    log_completions_hub_repo use_transformers_continuous_batching
    transformers_continuous_batching_config use_transformers_paged
    vllm_importance_sampling_cap
    """,
    "orpo": """
    max_length max_completion_length beta disable_dropout padding_value generate_during_eval
    is_encoder_decoder model_init_kwargs trust_remote_code dataset_num_proc
    """,
    "model": """
    model_name_or_path model_revision dtype attn_implementation use_peft lora_r lora_alpha
    lora_dropout lora_target_modules lora_target_parameters lora_modules_to_save
    lora_task_type use_rslora use_dora load_in_8bit load_in_4bit bnb_4bit_quant_type
    use_bnb_nested_quant bnb_4bit_quant_storage
    """,
    "script": """
    dataset_name dataset_config dataset_train_split dataset_test_split dataset_streaming
    ignore_bias_buffers
    """,
    "mixture": """
    datasets streaming test_split_size
    """,
}

# Axolotl's nested models (utils/schemas/datasets.py, trl.py, fsdp.py; checked against its main
# branch after 0.18.0): the keys of a `datasets:` / `test_datasets:` entry (one of SFTDataset,
# DPODataset, KTODataset, StepwiseSupervisedDataset, SyntheticDataset), of a `type:` given as a
# mapping (the user_defined prompt formats), of a `pretraining_dataset:` entry, of `trl:` and
# of `fsdp_config:`.
AXOLOTL_DATASET = {
    "SFTDataset": """
    path split type input_transform shards shards_idx preprocess_shards conversation
    chat_template chat_template_jinja data_files input_format name ds_type field field_human
    field_model field_messages field_tools field_thinking template_thinking_key
    message_field_role message_field_content message_property_mappings message_field_training
    message_field_training_detail split_thinking logprobs_field temperature roles_to_train
    train_on_eos train_on_eot roles drop_system_message trust_remote_code revision
    """,
    "DPODataset": """
    path split type data_files revision field_messages field_chosen field_rejected
    """,
    "KTODataset": """
    path split type data_files trust_remote_code revision
    """,
    "StepwiseSupervisedDataset": """
    path split data_files revision step_separator max_completion_length
    train_on_last_step_only
    """,
    "SyntheticDataset": """
    path type length sequence_length min_input_id max_input_id seed
    """,
}
AXOLOTL_DATASET_TYPE = {
    "UserDefinedPrompterType": """
    system_prompt system_format field_system field_instruction field_input field_output format
    no_input_format
    """,
    "UserDefinedDPOType": """
    field_system field_prompt field_chosen field_rejected prompt_format chosen_format
    rejected_format
    """,
    "UserDefinedKTOType": """
    field_system field_prompt field_completion field_label prompt_format completion_format
    """,
}
AXOLOTL_PRETRAINING_DATASET = names("""
name path split text_column type trust_remote_code data_files skip
""")
AXOLOTL_TRL = names("""
beta max_completion_length use_vllm vllm_mode vllm_server_host vllm_server_port
vllm_server_timeout vllm_guided_decoding_regex reward_funcs reward_weights
generation_batch_size num_generations log_completions num_completions_to_print
importance_sampling_level sync_ref_model ref_model_mixup_alpha ref_model_sync_steps
scale_rewards temperature top_p top_k min_p repetition_penalty generation_kwargs
chat_template_kwargs num_iterations epsilon epsilon_high use_liger_loss loss_type
mask_truncated_completions vllm_enable_sleep_mode rollout_func multi_objective_aggregation
use_data_producer async_prefetch prefetch_depth vllm_sync_interval streaming_partial_batch
streaming_min_groups vllm_importance_sampling_correction vllm_importance_sampling_mode
vllm_importance_sampling_cap off_policy_mask_threshold use_bias_correction_kl
reward_num_workers replay_buffer_size replay_recompute_logps reroll_start_fraction
reroll_max_groups skip_zero_advantage_batches vllm_lora_sync
""")
AXOLOTL_FSDP = names("""
fsdp_version activation_checkpointing offload_params sync_module_states
cpu_ram_efficient_loading cpu_offload_pin_memory use_orig_params state_dict_type
final_state_dict_type auto_wrap_policy transformer_layer_cls_to_wrap min_num_params
reshard_after_forward mixed_precision_policy
""")
