"""`python -m localtune` is the same as the `localtune` command."""

from localtune.cli import main

raise SystemExit(main())
