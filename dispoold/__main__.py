"""``python -m dispoold``: the daemon, as the ``dispoold`` command runs it."""

import sys

from dispoold.daemon import main

sys.exit(main())
