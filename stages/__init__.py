"""The pipeline's stages: one module per DVC stage, and the modules they share."""
