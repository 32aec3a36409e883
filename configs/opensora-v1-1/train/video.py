# Open-Sora v1.1 multi-resolution video training: stage1 settings, video buckets
# (bucket values from the config guide's video.py example).
_base_ = ["./stage1.py"]

bucket_config = {
    "_delete_": True,
    "240p": {16: (1.0, 16), 32: (1.0, 8), 64: (1.0, 4), 128: (1.0, 2)},
    "480p": {16: (1.0, 4), 32: (0.0, None)},
    "720p": {16: (0.5, 2)},
}
grad_checkpoint = True
