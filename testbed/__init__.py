"""What tests and benchmarks both run against, started for real on this machine: the
pipeline as dvc.yaml defines it and its files copied (pipeline), processes run as a user's
shell runs them (processes), two hosts in network namespaces (hosts), an S3 object store
on one (objectstore), an OpenSSH server (sshd), and digits drawn as a hand draws them
(drawing).

Tests and benchmarks import it; it imports neither (tests/unit/test_layers.py). It is used
from the checkout, never installed."""
