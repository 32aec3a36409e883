# Open-Sora v1.0.0 configs/latte/inference/16x256x256-class.py: the same keys and values, as that release wrote it.
# Weights are read from local paths only (HF ids with local_files_only=True, upstream files under pretrained_models/).

num_frames = 16
fps = 8
image_size = (256, 256)
model = dict(
    type="Latte-XL/2", condition="label_101", from_pretrained="pretrained_models/Latte-XL-2-256x256-ucf101.pt"
)
vae = dict(type="VideoAutoencoderKL", from_pretrained="stabilityai/sd-vae-ft-ema", local_files_only=True)
text_encoder = dict(type="classes", num_classes=101)
scheduler = dict(type="dpm-solver", num_sampling_steps=20, cfg_scale=4.0)
dtype = "fp16"
batch_size = 2
seed = 42
prompt_path = "./assets/texts/ucf101_id.txt"
save_dir = "./outputs/samples/"
