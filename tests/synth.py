"""Small generated image datasets for the training tests: learnable in seconds, no shared data needed."""

from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINYNET = str(REPO / "examples" / "tinynet.py") + ":TinyNet"
TINY = ["--model", TINYNET, "--model-kwargs", '{"width": 8}']  # 0.12 M parameters: seconds per epoch at 32 px
QUICK = ["--img-size", "32", "-b", "16", "-j", "0", "--warmup-epochs", "0"]


def make_image_folder(root: Path, classes: int = 4, train_per_class: int = 24, val_per_class: int = 8,
                      size: int = 40, seed: int = 0) -> Path:
    """root/train/cXX/*.jpg and root/val/cXX/*.jpg: each class a colour and a stripe orientation, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = Path(root) / split / f"c{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            colour = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 29 + 160) % 256], dtype=np.float32)
            angle = np.pi * c / classes
            for i in range(n):
                phase = rng.uniform(0, 2 * np.pi)
                stripes = np.sin(2 * np.pi * 4 * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
                img = colour * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 20, (size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{split}_{c}_{i}.jpg", quality=90)
    return Path(root)


def slow_model_source(sleep: float) -> str:
    """A model file for tests that signal or kill training mid-epoch: a small convnet (with dropout, so the RNG
    matters) that sleeps `sleep` seconds per training forward."""
    return f'''
import time
from torch import nn

class Slow(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
    def forward(self, x):
        if self.training:
            time.sleep({sleep})
        return self.net(x)
'''
