"""Plain C: each network trained by a C program of its own (mnist_mlp.c, mnist_cnn.c), no
framework."""
