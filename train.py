"""Train a resstream model: `python train.py [--config configs/NAME.py] [--config.train.steps=N ...]`.

With no arguments it trains configs/default.py on the built-in corpus (this interpreter's own
standard-library sources) and writes checkpoints, metrics, plots, samples and a report to runs/default.
"""

from resstream.cli import train_main

if __name__ == "__main__":
    train_main()
