"""`python -m privdpo ...` (and `torchrun ... -m privdpo ...`): the `privdpo` command."""

import sys

from privdpo.cli import main

sys.exit(main())
