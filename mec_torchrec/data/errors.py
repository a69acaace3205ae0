"""The one error type of the data layer: bad input, named precisely (file, row, column)."""


class DataError(ValueError):
    """Bad dataset input: a missing or unreadable file, a malformed row, a spec that does not match
    the data. The message names the file and, where it applies, the row and column at fault."""
