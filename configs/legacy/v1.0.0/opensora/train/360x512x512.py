# Open-Sora v1.0.0 configs/opensora/train/360x512x512.py: the same keys and values, as that release wrote it.
# Weights are read from local paths only (HF ids with local_files_only=True, upstream files under pretrained_models/).

num_frames = 360
frame_interval = 1
image_size = (512, 512)
root = None
data_path = "CSV_PATH"
use_image_transform = False
num_workers = 4
dtype = "bf16"
grad_checkpoint = True
plugin = "zero2-seq"
sp_size = 2
model = dict(
    type="STDiT-XL/2",
    space_scale=1.0,
    time_scale=2 / 3,
    from_pretrained=None,
    enable_flashattn=True,
    enable_layernorm_kernel=True,
    enable_sequence_parallelism=True,
)
vae = dict(
    type="VideoAutoencoderKL",
    from_pretrained="stabilityai/sd-vae-ft-ema",
    micro_batch_size=128,
    local_files_only=True,
)
text_encoder = dict(
    type="t5", from_pretrained="./pretrained_models/t5_ckpts", model_max_length=120, shardformer=True
)
scheduler = dict(type="iddpm", timestep_respacing="")
seed = 42
outputs = "outputs"
wandb = False
epochs = 1000
log_every = 10
ckpt_every = 250
load = None
batch_size = 1
lr = 2e-05
grad_clip = 1.0
