"""The training loop's parts; ``training.train.train`` orchestrates them."""
