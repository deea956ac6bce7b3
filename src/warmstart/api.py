"""The Python API, for people who fine-tune in their own code. Same trust rules as the CLI (checkpoint.load_model).

    import warmstart
    model = warmstart.load_model("runs/mynet/checkpoints/best.pt", num_classes=37)   # new 37-class head
    backbone = warmstart.load_backbone("runs/mynet/checkpoints/best.pt")             # (N, backbone.feature_dim)
    preprocess = warmstart.eval_transform("runs/mynet/checkpoints/best.pt")          # PIL image -> normalised tensor
"""

import torch
from torchvision.transforms import v2

from warmstart import checkpoint
from warmstart.data import transforms
from warmstart.heads import backbone, replace_head


def load_model(ckpt, num_classes: int | None = None, *, ema: bool | None = None,
               trust_code: bool = False) -> torch.nn.Module:
    """The checkpoint's model with its weights, in eval mode. num_classes: replace the classifier with a freshly
    initialised one of that size (the rest keeps its pretrained weights)."""
    loaded = checkpoint.load_model(ckpt, ema=ema, trust_code=trust_code)
    if num_classes is not None and num_classes != len(loaded.classes):
        replace_head(loaded.model, num_classes, loaded.head)
    return loaded.model


def load_backbone(ckpt, *, ema: bool | None = None, trust_code: bool = False) -> torch.nn.Module:
    """The checkpoint's model without its classifier: returns pooled features (N, model.feature_dim)."""
    loaded = checkpoint.load_model(ckpt, ema=ema, trust_code=trust_code)
    model, dim = backbone(loaded.model, loaded.head)
    model.feature_dim = dim
    return model


def eval_transform(ckpt) -> v2.Compose:
    """The checkpoint's own evaluation preprocessing (resize, centre crop, mean/std) as a torchvision transform:
    an image path, PIL image or uint8 tensor in, normalised float32 CHW tensor out. Builds no model."""
    spec = checkpoint.read_transform(ckpt)
    return v2.Compose([transforms.eval_pipeline(spec), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(spec["mean"], spec["std"])])
