"""resstream's entry point: `python train.py --config configs/NAME.py [field=value ...]`.

The training loop is not built yet; today this runs a forward pass and the exact decomposition on
random weights (see resstream/cli.py).
"""

import sys

from resstream.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
