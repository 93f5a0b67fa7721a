"""``python -m smartdiff``: the same command line as the ``smartdiff`` script
(``smartdiff.cli``)."""

from smartdiff.cli import main

raise SystemExit(main())
