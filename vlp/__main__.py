"""`python -m vlp COMMAND ...`: the same as the `vlp` console command."""
import sys

from vlp.cli import main

sys.exit(main())
