"""ImageNet data for calibration and evaluation: folders, preprocessing, splits."""
