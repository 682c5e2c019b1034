"""Unit tests: in memory, no sockets, no processes (except ssh-keygen when present)."""

import os
import tempfile

from hypothesis.configuration import set_hypothesis_home_dir

# Keep Hypothesis's caches out of the repository.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "buildbot-sshmux-hypothesis"))
