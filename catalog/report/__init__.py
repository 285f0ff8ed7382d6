"""The findings report (part 5): seed 000 and seed 001 figures of one catalog as PNGs and one HTML page.

``data`` turns SQL rows into figure data (one query per figure), ``captions`` says what each figure
shows and which seed claim it tests, ``figures`` draws it with matplotlib, ``build`` lists the figures,
``html`` writes the report directory. The UI's model and layer pages serve the same PNGs.
"""

from __future__ import annotations


class ReportError(Exception):
    """The report cannot be written where asked (the target is a file, or not writable)."""


class NothingToDraw(ValueError):
    """A figure whose data has a note (why there is nothing to draw) instead of numbers."""
