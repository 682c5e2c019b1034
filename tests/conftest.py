"""A fix for pytest's trial support on Twisted 24, for every suite.

On Twisted 24 (not 25 or later) pytest wraps ``Failure.__init__`` while a
test runs and keeps each failure's raw ``sys.exc_info()`` in its
``__dict__`` (``_pytest.unittest.TWISTED_RAW_EXCINFO_ATTR``).  PB sends a
failure to its peer as a ``CopyableFailure`` built from that ``__dict__``,
so the exception class inside the tuple goes over the wire and the peer's
jelly refuses it (``InsecureJelly: b'class'``): every PB login refused
in process (a wrong password, a name the host may not use) then kills
the worker's broker instead of failing its login.  Outside pytest (trial,
twistd, ``buildbot start``) there is no such attribute.  Here it is left
out of what PB copies.
"""

from __future__ import annotations

from typing import Any

from twisted.spread import pb

try:
    from _pytest.unittest import TWISTED_RAW_EXCINFO_ATTR
except ImportError:  # a pytest without that wrapper
    TWISTED_RAW_EXCINFO_ATTR = None

if TWISTED_RAW_EXCINFO_ATTR is not None:
    _state_to_copy = pb.CopyableFailure.getStateToCopy

    def _without_pytest_excinfo(self: pb.CopyableFailure) -> dict[str, Any]:
        state = _state_to_copy(self)
        state.pop(TWISTED_RAW_EXCINFO_ATTR, None)
        return state

    pb.CopyableFailure.getStateToCopy = _without_pytest_excinfo  # type: ignore[method-assign]
