"""What the library tells a person while it works: notes on the "zoo" logger and progress bars.

Notes (where weights came from, validation losses, warnings) go to logging.getLogger("zoo"), which
shows them on stderr by default; `logging.getLogger("zoo").setLevel(logging.WARNING)` silences the
notes, and a handler of the user's own replaces ours. Progress bars are tqdm's on stderr, off with
`progress=False` where a function takes it. Notes are written through tqdm so they never break a bar.
"""
import logging
import sys

log = logging.getLogger("zoo")


class _StderrHandler(logging.Handler):
    """Writes to the sys.stderr of the moment (not the one at import), above any progress bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # never let a note break the work it describes
            self.handleError(record)


if not log.handlers:
    log.addHandler(_StderrHandler())
    log.setLevel(logging.INFO)
    log.propagate = False  # shown once, by our handler; a user who wants it elsewhere replaces it


def bar(total=None, initial=0, unit="it", enabled=True):
    """A tqdm progress bar on stderr, or a stand-in with the same methods that shows nothing."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, file=sys.stderr, disable=not enabled)
