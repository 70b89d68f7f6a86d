"""The pipeline's stages, one module per DVC stage, in dvc.yaml's order: download,
normalize, train, evaluate, render_errors. What they share sits in sub-packages by concern:
runtime (how a stage runs and fails), data (formats and loading), training (what the
training loops share), frameworks (Keras, PyTorch and C behind one seam) and analysis
(scores and error reports)."""
