"""The one exception type users see from phase 1.

Every message names what is wrong and how to fix it; the CLI prints it without a traceback.
"""


class CacheError(Exception):
    """A problem with the user's input or store, phrased as problem + fix."""
