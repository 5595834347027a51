"""How the library batches a forget set when it does so itself (the callback, the command line): the batch size
from the forget set's size, and the most samples one batch (or one verification pass) holds."""

from __future__ import annotations

import math

#: When the library batches the forget set itself (the callback, the command line): this many steps per pass, at most
#: this many samples per batch.
STEPS_PER_PASS = 8
MAX_BATCH = 256


def batch_size_for(n_forget: int) -> int:
    """The forget batch size when the library batches the forget set: :data:`STEPS_PER_PASS` steps per pass.

    Example:
        >>> batch_size_for(135), batch_size_for(3), batch_size_for(100_000)
        (17, 1, 256)
    """
    return max(1, min(MAX_BATCH, math.ceil(int(n_forget) / STEPS_PER_PASS)))
