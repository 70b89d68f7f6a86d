"""Plain C: the original network trained by one C program (mnist_mlp.c), no framework."""
