# Demo: Open-Sora v1.2 training (STDiT3 + rflow) shrunk to run on a 2-core CPU in minutes.
# The text encoder and VAE are tiny models with RANDOM weights that `opensora demo-data`
# writes locally and that load through the real `from_pretrained` path: the samples are noise.
dataset = dict(
    type="VariableVideoTextDataset",
    data_path="demo_data",  # a folder of media + .txt captions, an Open-Sora CSV, or a scanned .parquet
    frame_interval=1,
    transform_name="resize_crop",
)
bucket_config = {
    "144p": {1: (1.0, 4), 17: (1.0, 2)},
    "240p": {1: (0.5, 2), 17: (0.5, 1)},
}
mask_ratios = {
    "random": 0.05,
    "quarter_head": 0.05,
    "image_head": 0.1,
}

num_workers = 1
num_bucket_build_workers = 2
dtype = "fp32"
grad_checkpoint = False
plugin = "zero2"
sp_size = 1

model = dict(
    type="STDiT3-XL/2",
    from_pretrained=None,
    hidden_size=64,
    depth=2,
    num_heads=4,
    qk_norm=True,
    enable_flash_attn=False,
    enable_layernorm_kernel=False,
)
vae = dict(
    type="VideoAutoencoderKL",
    from_pretrained="demo_data/pretrained/vae",
    micro_batch_size=4,
    local_files_only=True,
)
text_encoder = dict(
    type="t5",
    from_pretrained="demo_data/pretrained/t5",
    model_max_length=16,
    shardformer=True,
    local_files_only=True,
)
scheduler = dict(
    type="rflow",
    use_timestep_transform=True,
    sample_method="logit-normal",
    num_sampling_steps=8,
    cfg_scale=7.0,
)

seed = 42
outputs = "outputs/demo"
wandb = False
epochs = 4
max_steps = 12
log_every = 1
ckpt_every = 6
load = None
grad_clip = 1.0
lr = 1e-4
ema_decay = 0.99
adam_eps = 1e-15
warmup_steps = 4

# Training workers (Ray Train): 2 CPU workers with gloo here, GPUs on a cluster.
num_train_workers = 2

# Evaluation after each checkpoint (sampled with the EMA weights).
eval_prompts = [
    "a red square drifts left over a blue gradient",
]
eval_resolution = "144p"
eval_aspect_ratio = "9:16"
eval_num_frames = 17
eval_fps = 24
eval_seed = 1024
# Evaluation loss per bucket (`opensora eval-loss`, run by the evaluate stage on the training workers) on a
# held-out share of the snapshot, chosen by path hash; training leaves that share out.
val_fraction = 0.25
num_eval_timesteps = 4
