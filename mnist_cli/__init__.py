"""The commands a user runs on the pipeline's results: mnist-predict (predict.py) and
mnist-errors-diff (errors_diff.py). They read what the stages wrote; no stage imports them,
so editing a command reruns nothing."""
