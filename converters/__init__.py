"""One module per export target; each exposes ``convert(ctx, precisions)``."""
