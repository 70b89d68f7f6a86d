"""Developer tools run by make: the locks (`make lock`, `make check-wheels`) and the
project on every supported Python (`make test-pythons`)."""
