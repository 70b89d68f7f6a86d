"""Data formats and loading: MNIST's layout (mnist), safe .npz reading (npz), the original
idx format (idx), and the original script's console drawing of a digit (console)."""
