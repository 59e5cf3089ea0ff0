"""Entry point for `python app.py` and Hugging Face Spaces: flags / environment -> glmapp.ui.launch.

`python app.py --help` lists every flag and the environment variable that sets it.
"""

import sys

from glmapp.errors import GlmappError
from glmapp.ui import launch, load_config


def main(argv=None) -> int:
    try:
        launch(load_config(argv))
    except GlmappError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
