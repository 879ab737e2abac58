#!/usr/bin/env python
"""Data prep entry script: audio catalog -> DAC codes -> WebDataset shards.

    python data_prep/prep.py all catalog=/music out_dir=/data/codes codec=dac_44khz
    python data_prep/prep.py encode --task-index 0 --num-tasks 8 catalog=... out_dir=...

Same as ``vampnet-pl prep ...``; settings live in conf/prep.yaml.
"""

import sys

from vampnet_pl.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep", *sys.argv[1:]]))
