"""Prompt templates per dataset. ImageNet's come from open_clip; the others are CoOp's (one per dataset)."""
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

IMAGENET_TRAIN = ("a photo of a {}.",)
IMAGENET_EVAL = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": IMAGENET_TRAIN}

COOP = {
    "caltech101": ("a photo of a {}.",),
    "oxford_pets": ("a photo of a {}, a type of pet.",),
    "stanford_cars": ("a photo of a {}.",),
    "oxford_flowers": ("a photo of a {}, a type of flower.",),
    "food101": ("a photo of {}, a type of food.",),
    "fgvc_aircraft": ("a photo of a {}, a type of aircraft.",),
    "sun397": ("a photo of a {}.",),
    "dtd": ("{} texture.",),
    "eurosat": ("a centered satellite photo of {}.",),
    "ucf101": ("a photo of a person doing {}.",),
}
