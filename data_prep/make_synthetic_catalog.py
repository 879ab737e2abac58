#!/usr/bin/env python
"""Write a deterministic synthetic music catalog: python data_prep/make_synthetic_catalog.py DIR --files 24"""

import sys

from vampnet_pl.cli import main

if __name__ == "__main__":
    sys.exit(main(["catalog", "synthetic", *sys.argv[1:]]))
