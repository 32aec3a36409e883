# Open-Sora v1.1 multi-resolution image training: stage1 settings, image-only buckets
# (bucket values from the config guide's image.py example).
_base_ = ["./stage1.py"]

bucket_config = {
    "_delete_": True,
    "256": {1: (1.0, 256)},
    "512": {1: (1.0, 80)},
    "480p": {1: (1.0, 52)},
    "1024": {1: (1.0, 20)},
    "1080p": {1: (1.0, 8)},
}
