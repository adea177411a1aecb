"""The training core shared by the methods that train: data (harness.train.data) and the loop (harness.train.loop)."""
