"""The shell commands glmapp's messages tell a user to run, one home for each.

tests/test_commands.py runs every one of them (with `--help`) after the README's install, so a command
that no longer exists (`huggingface-cli` is gone from huggingface_hub 1.0 on) cannot linger in a message.
"""

from glmapp.choices import DEFAULT_MODEL

MAKE_DEMO = "glmapp make-demo --out DIR"
RUN_APP_WITH_MODEL = "python app.py --model PATH"
RUN_APP = "python app.py"


def download(model: str = DEFAULT_MODEL) -> str:
    """The command that puts `model` into the Hugging Face cache, where glmapp looks for it."""
    return f"hf download {model}"
