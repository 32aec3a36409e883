# Open-Sora v1.1.0 configs/pixart/train/1x512x512.py: the same keys and values, as that release wrote it.
# Weights are read from local paths only (HF ids with local_files_only=True, upstream files under pretrained_models/).

dataset = dict(type="VideoTextDataset", data_path=None, num_frames=1, frame_interval=3, image_size=(512, 512))
num_workers = 4
dtype = "bf16"
grad_checkpoint = True
plugin = "zero2"
sp_size = 1
model = dict(
    type="PixArt-XL/2",
    space_scale=1.0,
    time_scale=1.0,
    no_temporal_pos_emb=True,
    from_pretrained="pretrained_models/PixArt-XL-2-512x512.pth",
    enable_flashattn=True,
    enable_layernorm_kernel=True,
)
vae = dict(type="VideoAutoencoderKL", from_pretrained="stabilityai/sd-vae-ft-ema", local_files_only=True)
text_encoder = dict(
    type="t5",
    from_pretrained="DeepFloyd/t5-v1_1-xxl",
    model_max_length=120,
    shardformer=True,
    local_files_only=True,
)
scheduler = dict(type="iddpm", timestep_respacing="")
seed = 42
outputs = "outputs"
wandb = False
epochs = 1000
log_every = 10
ckpt_every = 1000
load = None
batch_size = 32
lr = 2e-05
grad_clip = 1.0
