"""``python -m agent`` is the ``callgate`` command."""

from agent.cli import main

raise SystemExit(main())
