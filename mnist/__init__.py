"""The commands a user runs on the pipeline's results: mnist-predict (mnist/predict.py) and
mnist-errors-diff (mnist/errors_diff.py). They read what the stages wrote; no stage imports
them."""
