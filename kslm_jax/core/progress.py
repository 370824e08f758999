"""Progress bars for the long stretches of eval, prepare and tokenize: rate and ETA on a terminal, nothing
when stderr is a file or a pipe (logs and CI stay clean), like the training bar."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(total: float | None = None, desc: str = "", unit: str = "it", scale: bool = False) -> tqdm:
    """A transient bar on stderr; `disable=None` is tqdm's own check that stderr is a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, dynamic_ncols=True, leave=False,
                file=sys.stderr, disable=None, mininterval=0.5)
