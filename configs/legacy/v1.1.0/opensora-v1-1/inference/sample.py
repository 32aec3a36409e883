# Open-Sora v1.1.0 configs/opensora-v1-1/inference/sample.py: the same keys and values, as that release wrote it.
# Weights are read from local paths only (HF ids with local_files_only=True, upstream files under pretrained_models/).

num_frames = 16
frame_interval = 3
fps = 24
image_size = (240, 426)
multi_resolution = "STDiT2"
model = dict(
    type="STDiT2-XL/2",
    from_pretrained="hpcai-tech/OpenSora-STDiT-v2-stage3",
    input_sq_size=512,
    qk_norm=True,
    enable_flash_attn=True,
    enable_layernorm_kernel=True,
)
vae = dict(
    type="VideoAutoencoderKL",
    from_pretrained="stabilityai/sd-vae-ft-ema",
    cache_dir=None,
    micro_batch_size=4,
    local_files_only=True,
)
text_encoder = dict(
    type="t5",
    from_pretrained="DeepFloyd/t5-v1_1-xxl",
    cache_dir=None,
    model_max_length=200,
    local_files_only=True,
)
scheduler = dict(type="iddpm", num_sampling_steps=100, cfg_scale=7.0, cfg_channel=3)
dtype = "bf16"
prompt_path = "./assets/texts/t2v_samples.txt"
prompt = None
batch_size = 1
seed = 42
save_dir = "./samples/samples/"
