"""`python -m moekit.train ...` = `moekit train ...`; the form torchrun launches:
`torchrun --nproc-per-node N -m moekit.train --recipe NAME --out DIR --set 'moe_layer={}'`."""

import sys

from moekit.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
