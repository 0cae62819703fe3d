"""Phase 2's error type (see embed_cache.errors for the family)."""

from embed_cache.errors import JasperError


class DistillError(JasperError):
    """Phase 2: the training config, a run directory, a checkpoint or the student."""
