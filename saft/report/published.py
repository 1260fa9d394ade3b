"""Published reference rows (CLIP ViT-B/16, 16 shots, mean of 3 seeds) as quoted in method.md.

Check each against its paper before a report is published; the report marks them "(published)".
"""
# Domain generalisation, trained on ImageNet: ImageNet, -V2, -Sketch, -A, -R.
DOMAIN_GENERALISATION = {
    "zero-shot CLIP (CoOp/MaPLe)": (66.73, 60.83, 46.15, 47.77, 73.96),
    "CoOp (IJCV 2022)": (71.51, 64.20, 47.99, 49.71, 75.21),
    "CoCoOp (CVPR 2022)": (71.02, 64.07, 48.75, 50.63, 76.18),
    "MaPLe (CVPR 2023)": (70.72, 64.07, 49.15, 50.90, 76.98),
    "CLIPood (ICML 2023)": (71.6, 64.9, 49.3, 50.4, 77.2),
}

# Base-to-new, average over the 11 datasets: base, new, harmonic mean (MaPLe repository's README).
BASE_TO_NEW_AVERAGE = {
    "zero-shot CLIP": (69.34, 74.22, 71.70),
    "CoOp": (82.69, 63.22, 71.66),
    "CoCoOp": (80.47, 71.69, 75.83),
    "MaPLe": (82.28, 75.14, 78.55),
}
