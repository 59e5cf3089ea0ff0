"""Errors the store raises; each names what was wrong and what to do."""

from glmapp.errors import GlmappError


class StoreError(GlmappError):
    """The database cannot be opened or migrated, or a stored value is out of range."""


class NotFound(StoreError):
    """No such conversation or message for this owner (another owner's looks the same: absent)."""


class ImportFormatError(StoreError):
    """An imported JSON file is not a glmapp conversation export."""
