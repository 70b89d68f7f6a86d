"""What the frameworks' training loops share: the batch order, the epoch report and the
best epoch (epochs), the augmentation's geometry (augment), and which worker of a
data-parallel run this process is (distributed)."""
