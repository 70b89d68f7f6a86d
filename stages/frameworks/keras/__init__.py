"""Keras (TensorFlow): its env, networks and model file, and its training loop."""
