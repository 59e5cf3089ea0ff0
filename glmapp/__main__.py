"""`python -m glmapp ...` == `glmapp ...`."""

import sys

from glmapp.cli import main

sys.exit(main())
