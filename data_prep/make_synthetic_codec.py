#!/usr/bin/env python
"""Build the small seeded random DAC used offline: python data_prep/make_synthetic_codec.py PATH"""

import sys

from vampnet_pl.cli import main

if __name__ == "__main__":
    sys.exit(main(["codec", "synthetic", *sys.argv[1:]]))
