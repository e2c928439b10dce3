"""python -m cacheflow_serve runs the cacheflow command."""
import sys

from cacheflow_serve.cli import main

sys.exit(main())
