"""Triton kernels of the GPU OpSet. Importing this package does not import triton."""
from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether this process runs Triton's CPU interpreter (TRITON_INTERPRET=1). A fact of the Triton runtime,
    not one of our switches: Triton reads it when a kernel is defined, so it must be set before then."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
