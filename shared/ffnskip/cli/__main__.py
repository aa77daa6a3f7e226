"""`python -m ffnskip.cli ...`: the `ffnskip` command."""

import sys

from ffnskip.cli.app import main

sys.exit(main())
