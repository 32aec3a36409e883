# Open-Sora v1.1.0 configs/dit/train/16x256x256.py: the same keys and values, as that release wrote it.
# Weights are read from local paths only (HF ids with local_files_only=True, upstream files under pretrained_models/).

dataset = dict(
    type="VideoTextDataset", data_path=None, num_frames=16, frame_interval=3, image_size=(256, 256)
)
num_workers = 4
dtype = "bf16"
grad_checkpoint = True
plugin = "zero2"
sp_size = 1
model = dict(
    type="DiT-XL/2",
    from_pretrained="pretrained_models/DiT-XL-2-256x256.pt",
    enable_flashattn=True,
    enable_layernorm_kernel=True,
)
vae = dict(type="VideoAutoencoderKL", from_pretrained="stabilityai/sd-vae-ft-ema", local_files_only=True)
text_encoder = dict(
    type="clip", from_pretrained="openai/clip-vit-base-patch32", model_max_length=77, local_files_only=True
)
scheduler = dict(type="iddpm", timestep_respacing="")
seed = 42
outputs = "outputs"
wandb = False
epochs = 1000
log_every = 10
ckpt_every = 1000
load = None
batch_size = 8
lr = 2e-05
grad_clip = 1.0
