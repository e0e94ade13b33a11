#!/usr/bin/env python3
"""hcbench: benchmark residual, Hyper-Connections and mHC connections. See README.md."""
import sys

from suite.cli import main

if __name__ == "__main__":
    sys.exit(main())
