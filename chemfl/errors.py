"""The one error type users see: it names the problem and the fix."""


class ChemFLError(ValueError):
    """Bad input, raised before any work starts. The message says what is wrong and how to fix it."""
